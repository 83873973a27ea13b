"""Shared by the fine-tuning tests: one tiny pipeline folder per module (runs on it: helpers.small_run)."""
from __future__ import annotations

import pytest

from selora_kernels.data.tiny_pipeline import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    build_tiny_pipeline(folder, seed=0)
    return folder
