import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is much faster than two on a busy 2-core machine (OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
