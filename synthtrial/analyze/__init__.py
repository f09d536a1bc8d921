"""Effect estimation for simulated N-of-1 trials, set beside the simulated truth."""
