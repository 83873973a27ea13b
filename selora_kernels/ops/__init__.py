"""torch.library ops and the Python API of the compiled extension."""
