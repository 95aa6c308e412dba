"""Assemble .whl/: the wheels bench/gpu_accept.sh installs on a GPU machine that cannot download.

    .venv/bin/python bench/gpu_wheels.py [--python 3.12] [--cuda 13] [--budget-mib 64]

The GPU image bench/gpu_accept.sh is written for has Python 3.12 and
CUDA builds of torch, transformers, accelerate, safetensors, tokenizers, numpy, pandas, pyarrow and
the like, but no TRL, bitsandbytes, datasets or pydantic, and older transformers and
huggingface_hub than this project pins. This downloads, for that Python and manylinux x86_64, the
locked versions of those (requirements/lock.txt) and of the dependencies they need that such an
image lacks, each without its dependencies (`pip download --no-deps`), and one version of each.

torch itself is not carried (a CUDA torch wheel is ~1 GB): the image's is used, and gpu_accept.sh
records its version. bitsandbytes ships one library per CUDA version (129 MB unpacked); the wheel
is rewritten with only the CPU library and those for CUDA `--cuda` (its RECORD rewritten to match),
so that the set fits what one device call carries with the working tree (`--budget-mib`, 64 MiB:
the tracked files plus .whl/). Prints each wheel's size and the total; exits non-zero if over.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".whl"
# Locked in requirements/lock.txt and missing from the image (or there at another version).
PINNED = ("trl", "bitsandbytes", "datasets", "huggingface_hub", "transformers", "peft", "pydantic", "click", "rich")
# Their dependencies that the image lacks or may hold too old, at the lock's versions too.
DEPENDENCIES = ("pydantic_core", "typing-inspection", "annotated-types", "dill", "multiprocess", "fsspec",
                "httpx2", "httpcore2", "truststore", "hf-xet", "anyio", "idna")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """{name: version} of PINNED and DEPENDENCIES from requirements/lock.txt."""
    lock = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            lock[_canonical(name)] = ver
    missing = [n for n in PINNED + DEPENDENCIES if _canonical(n) not in lock]
    if missing:
        sys.exit(f"requirements/lock.txt has no {', '.join(missing)}: regenerate it (scripts/lock.py)")
    return {name: lock[_canonical(name)] for name in PINNED + DEPENDENCIES}


def download(requirements: list[str], python: str) -> None:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
            "--implementation", "cp", "-d", str(DEST)]
    for p in PLATFORMS:
        args += ["--platform", p]
    subprocess.run(args + requirements, check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_bitsandbytes(wheel: Path, cuda: str) -> tuple[int, list[str]]:
    """Rewrite the wheel in place without the native libraries of other CUDA/ROCm versions."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda}\d+)\.so$")
    dropped, kept_cuda, tmp = [], False, wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename == record:
                continue
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and not keep.search(base):
                dropped.append(base)
                continue
            kept_cuda |= base.startswith("libbitsandbytes_cuda")
            data = src.read(info)
            out.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        out.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    if not kept_cuda:
        tmp.unlink()
        sys.exit(f"{wheel.name} has no library for CUDA {cuda}: pass the image's major CUDA version with --cuda")
    tmp.replace(wheel)
    return wheel.stat().st_size, dropped


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="3.12", help="the GPU image's Python (major.minor)")
    ap.add_argument("--cuda", default="13", help="the major CUDA version of the image's torch (torch.version.cuda)")
    ap.add_argument("--budget-mib", type=float, default=64.0, help="what one device call carries: tracked files + .whl/")
    a = ap.parse_args()
    shutil.rmtree(DEST, ignore_errors=True)
    DEST.mkdir()
    requirements = [f"{n}=={v}" for n, v in pins().items()]
    download(requirements, a.python)
    bnb = next(DEST.glob("bitsandbytes-*.whl"))
    before = bnb.stat().st_size
    after, dropped = trim_bitsandbytes(bnb, a.cuda)
    wheels = sorted(DEST.glob("*.whl"))
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"bitsandbytes: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, without {len(dropped)} libraries ({', '.join(sorted(dropped))})")
    total, tree = sum(w.stat().st_size for w in wheels), tracked_bytes()
    print(f"gpu wheels | {len(wheels)} wheels, {total / 2**20:.1f} MiB; tracked files {tree / 2**20:.1f} MiB; "
          f"together {(total + tree) / 2**20:.1f} of {a.budget_mib:.0f} MiB")
    if total + tree > a.budget_mib * 2**20:
        sys.exit("over the budget: a device call would not carry the working tree and .whl/ together")


if __name__ == "__main__":
    main()
