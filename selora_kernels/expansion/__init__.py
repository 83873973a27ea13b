"""Fisher scoring, FI-Ratio decisions and the expansion controller."""
