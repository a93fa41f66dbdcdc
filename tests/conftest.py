"""Shared test setup: deterministic seeds, fp32 CPU threads, and the `gpu` / `weights` markers.

Under pytest-xdist (`-n 2`, the README command) each worker gets one thread, so the two workers share the two cores
instead of oversubscribing them.
"""

import os

import pytest
import torch

THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "weights: needs real released weights on disk (never in CI)")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    yield
