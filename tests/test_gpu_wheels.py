"""bench/gpu_wheels.py's rewrite of the bitsandbytes wheel: only the CPU and the chosen CUDA's
libraries stay, and the RECORD lists exactly the files left, with their hashes (what pip checks)."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_wheels  # noqa: E402

LIBS = ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026")


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "__version__ = '0'\n")
        for lib in LIBS:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", lib.encode() * 100)
        z.writestr("bitsandbytes-0.dist-info/METADATA", "Name: bitsandbytes\n")
        z.writestr("bitsandbytes-0.dist-info/RECORD", "stale\n")
    return path


def test_the_trimmed_wheel_keeps_cpu_and_cuda_13_and_a_true_record(tmp_path):
    wheel = _wheel(tmp_path / "bitsandbytes-0-py3-none-any.whl")
    _, dropped = gpu_wheels.trim_bitsandbytes(wheel, "13")
    assert sorted(dropped) == sorted(f"libbitsandbytes_{x}.so" for x in ("cuda118", "cuda128", "rocm72", "xpu2026"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.dist-info/RECORD").decode().splitlines()
        assert {n for n in names if n.endswith(".so")} == {f"bitsandbytes/libbitsandbytes_{x}.so" for x in ("cpu", "cuda130", "cuda132")}
        listed = {}
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            listed[name] = (digest, size)
        assert set(listed) == names
        for name in names - {"bitsandbytes-0.dist-info/RECORD"}:
            data = z.read(name)
            expected = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert listed[name] == (expected, str(len(data))), name


def test_a_cuda_version_the_wheel_lacks_is_refused(tmp_path):
    wheel = _wheel(tmp_path / "bitsandbytes-0-py3-none-any.whl")
    with pytest.raises(SystemExit, match="no library for CUDA 14"):
        gpu_wheels.trim_bitsandbytes(wheel, "14")
    assert len(zipfile.ZipFile(wheel).namelist()) == len(LIBS) + 3  # left as it was


def test_the_carried_versions_are_the_locks():
    """gpu_wheels.py downloads requirements/lock.txt's versions (pyproject.toml has ranges only)."""
    lock = {}
    for line in (Path(gpu_wheels.ROOT) / "requirements" / "lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            lock[name] = ver
    pins = gpu_wheels.pins()
    assert set(pins) == set(gpu_wheels.PINNED + gpu_wheels.DEPENDENCIES)
    for name, ver in pins.items():
        assert lock[name.replace("_", "-").lower()] == ver, name
