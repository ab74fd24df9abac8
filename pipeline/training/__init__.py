"""Models and how they learn: the model, the training loop, the batch feed, the K-fold, checkpoint ensembles, calibration and diagnostics."""
