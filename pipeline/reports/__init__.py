"""Every HTML page and plot the stages and tools write."""
