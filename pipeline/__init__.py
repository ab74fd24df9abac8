"""Data-centric dataset improvement pipeline for image classification."""

__version__ = "0.1.0"
