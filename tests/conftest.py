"""Test-session setup shared by every test package.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set before
triton is first imported, which is why it lives here at the top of the root conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): its
    matrices are tiny, and threads only add synchronisation on a shared, loaded CPU. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
