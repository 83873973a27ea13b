"""Fisher scoring, FI-Ratio decisions, batched growth and the expansion controller."""
