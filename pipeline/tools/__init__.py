"""What a user runs by hand: init, add-pool, add-labels, review, tune, lr-find, demo-data."""
