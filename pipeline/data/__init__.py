"""Files to arrays: scanning, decoding and packing images, near copies, image quality, bringing files in, the augmentation policy."""
