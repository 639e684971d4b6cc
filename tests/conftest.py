"""Test-session setup shared by every test package.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set before
triton is first imported, which is why it lives here at the top of the root conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
