"""Everything the package imports is declared in its own default requirements.

`quantize --format compressed-tensors` once needed a package that only the test extra installed: a
user's `pip install moecompress` ran the whole job, then failed on the import. Each third-party
module imported anywhere in the package (lazily inside functions too) must map to a distribution
named in pyproject.toml's `dependencies`, not only arrive as another package's requirement.
"""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("moecompress", "cli", "kernels")


def _imported_top_level_modules() -> dict[str, str]:
    """module -> first file importing it."""
    found: dict[str, str] = {}
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "moecompress":
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


# Imported only where the declared dependency itself brings them: module -> why.
FALLBACK_IMPORTS = {
    "click": "cli/main.py imports it only when typer has no vendored click (typer releases that require click)",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    declared = {
        _normalise(re.split(r"[<>=;!~\[ ]", spec, maxsplit=1)[0])
        for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(_imported_top_level_modules().items()):
        if module in FALLBACK_IMPORTS:
            continue
        dists = {_normalise(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (imported in {where}; distribution {sorted(dists)})")
    assert not missing, "imported but not in pyproject.toml dependencies:\n" + "\n".join(missing)
