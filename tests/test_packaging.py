"""A non-editable install (`pip install .`) carries the presets: the wheel built from the repository
holds every module of the package and every preset of configs/ (as retro_jax/configs/), and the
presets load from the unpacked wheel with the repository out of reach."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from retro_jax import config as config_lib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the repository's package sources (a copy, so that
    the build's build/ and egg-info folders never land in the working tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    for folder in ("retro_jax", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and "No matching distribution found for setuptools" in proc.stderr:
        pytest.skip("no package index to fetch the build backend (setuptools) from")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_holds_every_module_and_every_preset(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"retro_jax/{p.relative_to(ROOT / 'retro_jax').as_posix()}" for p in (ROOT / "retro_jax").rglob("*.py")}
    presets = {f"retro_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert "retro_jax/configs/tiny.py" in presets and len(presets) >= 10
    assert sorted(modules - names) == [] and sorted(presets - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "retro-jax = retro_jax.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


_PROBE = """
import json, pathlib, sys
import retro_jax
from retro_jax import config
site = pathlib.Path(sys.argv[1])
print(json.dumps({
    "package": str(pathlib.Path(retro_jax.__file__).resolve().parent.relative_to(site)),
    "configs_dir": str(config.CONFIGS_DIR.relative_to(site)),
    "presets": {name: cfg.to_dict() for name, cfg in config.presets().items()},
    "tiny_baseline": config.load_config("tiny-baseline").to_dict()["model"],
    "retro_1_5b": config.load_config("retro-1.5b", ["train.steps=7"]).to_dict()["train"]["steps"],
}))
"""


def test_presets_load_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no .pth files, so the editable install of this checkout is not on the path; the wheel's
    # folder comes first, then this environment's site-packages for the dependencies.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    proc = subprocess.run([sys.executable, "-S", "-c", _PROBE, str(site.resolve())], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout)
    assert (got["package"], got["configs_dir"]) == ("retro_jax", str(Path("retro_jax", "configs")))
    want = {name: cfg.to_dict() for name, cfg in config_lib.presets().items()}  # the checkout's configs/
    assert json.loads(json.dumps(want)) == got["presets"]
    assert got["tiny_baseline"]["name"] == "tiny-baseline" and list(got["tiny_baseline"]["cca_layers"]) == []
    assert got["retro_1_5b"] == 7
