"""Dequant-GEMM kernels for packed (kpack-v2) weights: Triton on GPU, pure torch everywhere.

The API lives in :mod:`moecompress.kernels.dispatch` (backend choice, dispatch) and the kernel
modules beside it, each with its pure-torch twin; this file re-exports it.

This folder sits at the top of the repository (the project layout) and installs as
``moecompress.kernels``. When Python runs from the repository root (``python -m pytest``,
``python -c``, a notebook) the root is on ``sys.path`` and this folder is also reachable as the
top-level ``kernels`` -- the name of Hugging Face's ``kernels`` package, which transformers imports
(``from kernels import CUDAProperties``). Imported under that name, this file hands the import over
to the installed ``kernels`` (or fails exactly as if none were installed), so it never shadows it.
"""

from __future__ import annotations


def _hand_over_top_level_name() -> None:
    """Replace this module in ``sys.modules['kernels']`` by the ``kernels`` found outside this repository."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    repo_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != repo_root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        sys.modules.pop("kernels", None)
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds under the name once this file has run.
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _hand_over_top_level_name()
else:
    from moecompress.kernels.dispatch import *  # noqa: F401,F403  (the public API, listed in __all__)
    from moecompress.kernels.dispatch import __all__  # noqa: F401
