"""A module-scoped autouse fixture: torch on one thread while a test module runs.

Tiny tensors run fastest on one thread; two threads on a busy 2-core machine spin-wait.
Import it into a test module to apply it there: ``from parity.tests.torch_threads import
one_torch_thread  # noqa: F401``.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
