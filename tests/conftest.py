"""Fixtures shared by test modules (modules opt in with ``pytestmark``)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One BLAS/OpenMP thread for a module of small matrices: with several threads the timings
    degrade badly when the machine's cores are busy with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
