"""Fixtures shared by the tests. The repository root is on sys.path through pytest.ini (pythonpath = .)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("VARUS_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real ultrasound samples, reference fixtures); skip when absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: these tests need the read-only shared data beside the checkout")
    return SHARED_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not fight training subprocesses for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> dict[str, Path]:
    """VQ-VAE, token file, processed set and VAR checkpoint of tests/tiny_pipeline.py (read-only for the tests)."""
    from tiny_pipeline import build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build(tmp_path_factory.mktemp("tiny_pipeline"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def no_hang() -> Iterator[None]:
    """A read that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""
    def hung(*_):
        raise TimeoutError("blocked: a read waited for a writer")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
