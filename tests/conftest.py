"""Shared test set-up."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the tests use tiny tensors, and on a busy 2-core machine OpenMP
    spin-waits make multi-threaded runs many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_slow(config) -> bool:
    """Slow tests run with MPQ_SLOW=1 or when ``-m`` selects them (``-m slow``)."""
    markexpr = config.getoption("markexpr", "") or ""
    return os.environ.get("MPQ_SLOW") == "1" or ("slow" in markexpr and "not slow" not in markexpr)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (every torchvision classifier); run with "
                                       "MPQ_SLOW=1 or -m slow")


def pytest_collection_modifyitems(config, items):
    if _run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow test: set MPQ_SLOW=1 or pass -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
