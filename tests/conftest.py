"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: the tiny models gain nothing from more, on a loaded 2-core machine
    spinning OpenMP threads slow them down tenfold, and a subprocess run with OMP_NUM_THREADS=1 adds floats
    in the same order only if the in-process run does too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
