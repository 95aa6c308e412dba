"""The lock and the ranges: what is installed is what requirements/lock.txt says, the lock lies inside
pyproject.toml's ranges, requirements/oldest.txt sits on their lower bounds, and the project's own
version has one definition that works without an install."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def test_installed_versions_equal_the_lock():
    """Every distribution the project and its extras need (walked through importlib.metadata) is
    installed at the locked version, and none is missing from the lock."""
    diff = lock.differences(lock.read_lock())
    assert not diff, "this environment differs from requirements/lock.txt (install with -c requirements/lock.txt):\n" + "\n".join(diff)


def test_a_different_version_is_reported(monkeypatch):
    pins = lock.read_lock()
    pins["trl"] = "0.0.1"
    del pins["click"]
    diff = lock.differences(pins)
    assert any(d.startswith("trl: installed") and "locked 0.0.1" in d for d in diff), diff
    assert any(d.startswith("click ") and "not in the lock" in d for d in diff), diff


def test_the_lock_lies_inside_the_ranges():
    pins = lock.read_lock()
    for req, extra in lock.project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} ({extra or 'dependencies'}) is not in requirements/lock.txt: run scripts/lock.py"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"locked {name}=={pins[name]} is outside {req}"
        assert req.specifier and all(s.operator != "==" for s in req.specifier), f"{req}: a range, not an exact pin"


def test_the_oldest_stack_sits_on_the_lower_bounds():
    """requirements/oldest.txt (bench/oldest_stack.sh) pins each direct dependency at its lower bound."""
    oldest = lock.read_lock(ROOT / "requirements" / "oldest.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower, f"{spec}: no lower bound"
        name = canonicalize_name(req.name)
        assert name in oldest, f"{name} is not in requirements/oldest.txt"
        assert Version(oldest[name]) == Version(lower[0]), f"{name}: oldest.txt has {oldest[name]}, the lower bound is {lower[0]}"


def test_library_versions_without_an_install(tmp_path):
    """With the checkout on PYTHONPATH and no lora-sdpo distribution (bench/gpu_accept.sh's way), the
    manifest's versions still name lora-sdpo's: its __version__, which pyproject.toml also reads."""
    site = Path(sysconfig.get_paths()["purelib"])
    bare = tmp_path / "site"
    bare.mkdir()
    for entry in site.iterdir():  # this environment's packages, less any trace of an installed lora-sdpo
        low = entry.name.lower()
        if not (low.startswith(("lora_sdpo", "lora-sdpo", "__editable__")) or low.endswith(".pth")):
            (bare / entry.name).symlink_to(entry)
    code = (
        "import importlib.metadata as md, lora_sdpo\n"
        "from lora_sdpo.run import library_versions\n"
        "try:\n    md.version('lora-sdpo'); print('INSTALLED')\n"
        "except md.PackageNotFoundError:\n    pass\n"
        "v = library_versions(); print(v['lora-sdpo'], lora_sdpo.__file__, v['torch'])\n"
    )
    checkout = tmp_path / "checkout"  # the package alone: not an egg-info an editable install may have left in ROOT
    checkout.mkdir()
    (checkout / "lora_sdpo").symlink_to(ROOT / "lora_sdpo")
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{bare}", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "INSTALLED" not in out.stdout
    import lora_sdpo

    got, where, _ = out.stdout.split()
    assert got == lora_sdpo.__version__ and Path(where).resolve().is_relative_to(ROOT)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lora_sdpo.__version__"}


@pytest.mark.parametrize("path", ["requirements/lock.txt", "requirements/oldest.txt"])
def test_the_files_parse(path):
    pins = lock.read_lock(ROOT / path)
    assert "torch" in pins and all(Version(v) for v in pins.values())
