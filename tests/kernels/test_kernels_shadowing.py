"""The repository's top-level ``kernels/`` folder must never shadow Hugging Face's ``kernels`` package.

transformers 5.25 imports ``kernels`` (``from kernels import CUDAProperties``) while loading any
model; Python run from the repository root (``python -m pytest``, ``python -c``, a notebook) has the
root on ``sys.path``, where our ``kernels/`` folder (installed as ``moecompress.kernels``) would win.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_from_repo_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_from_pretrained_works_from_the_repo_root(tmp_path):
    code = (
        "import sys\n"
        "from moecompress.model.tiny import save_tiny_model\n"
        "from transformers import AutoModelForCausalLM\n"
        f"save_tiny_model('qwen3_moe', {str(tmp_path)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "import kernels, moecompress.kernels as ours\n"
        f"assert not kernels.__file__.startswith({str(REPO_ROOT / 'kernels')!r}), kernels.__file__\n"
        "assert kernels is not ours and hasattr(ours, 'get_backend')\n"
        "print('ok')\n"
    )
    result = _run_from_repo_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_installed_kernels_package_is_the_one_imported():
    pytest.importorskip("kernels")  # transformers >= 5.25 installs it
    result = _run_from_repo_root("import kernels; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).resolve().parent != REPO_ROOT / "kernels"


def test_without_an_installed_kernels_the_name_is_absent():
    """No site-packages (-S): ``import kernels`` fails as if our folder were not there."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert exc.name == 'kernels' and 'kernels' not in sys.modules\n"
        "    print('absent')\n"
        "else:\n"
        "    print('imported', kernels.__file__)\n"
    )
    result = _run_from_repo_root(code, "-S")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "absent"
