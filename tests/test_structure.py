"""The package keeps its shape: no import cycles, train/, eval/ and infer/ never import one another, no
file over 400 lines; and the check finds each of those when one is planted."""

from __future__ import annotations

from pathlib import Path

import _structure

PACKAGE = Path(__file__).resolve().parent.parent / "retro_jax"


def test_the_package_has_no_cycle_no_sideways_import_and_no_long_file():
    mods, edges = _structure.import_graph(PACKAGE)
    assert {"retro_jax.train.loop", "retro_jax.eval.run", "retro_jax.runtime.state"} <= set(mods)
    assert "retro_jax.runtime.state" in edges["retro_jax.train.loop"]  # the graph sees real imports
    assert _structure.findings(PACKAGE) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_check_finds_each_planted_fault(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "import pkg.b\n",
        "b.py": "def f():\n    from . import a  # inside a function: still a cycle\n",
        "train/__init__.py": "", "eval/__init__.py": "",
        "train/loop.py": "from ..eval.run import score\n",
        "eval/run.py": "from pkg import a\nscore = 1\n",
        "infer/__init__.py": "", "infer/export.py": "def f():\n    from pkg.train import loop\n",
        "long.py": "x = 1\n" * 401,
    })
    assert _structure.findings(pkg) == [
        "import cycle: pkg.a <-> pkg.b",
        "pkg.infer.export imports pkg.train.loop (train/, eval/ and infer/ stand side by side on the runtime)",
        "pkg.train.loop imports pkg.eval.run (train/, eval/ and infer/ stand side by side on the runtime)",
        f"{pkg / 'long.py'}: 401 lines (keep files under about 400)",
    ]


def test_what_is_allowed_is_not_reported(tmp_path):
    """One-way imports, both siblings on a shared module, a package's __init__, 400 lines."""
    pkg = _write(tmp_path, {
        "__init__.py": "from pkg import runtime\n",
        "runtime.py": "import pkg\n",  # importing the package's __init__ is not an edge
        "train/__init__.py": "", "eval/__init__.py": "",
        "train/loop.py": "from pkg import runtime\n",
        "eval/run.py": "from .. import runtime\nimport pkg.train  # the subpackage's __init__ only\n",
        "long.py": "x = 1\n" * 400,
    })
    assert _structure.findings(pkg) == []
