"""requirements/lock.txt: the exact versions of everything lora-sdpo and its extras need, read off an environment.

    .venv/bin/python scripts/lock.py           # write requirements/lock.txt from this environment
    .venv/bin/python scripts/lock.py --check   # compare this environment with the lock; exit 1 on a difference

pyproject.toml declares ranges; the lock pins one tested point inside them, and the README's setup
command and .ci/run install with it (`pip install -c requirements/lock.txt ...`). The set is the
closure of pyproject.toml's dependencies and all its extras through each installed distribution's
own requirements (importlib.metadata, markers evaluated here), so regenerate it in an environment
that installed every extra. torch is written without its local label (`2.13.0`, not `2.13.0+cpu`):
pip takes the CPU build that lies in this machine's find-links for it, and a CUDA build elsewhere.
tests/test_lock.py runs the same comparison as --check.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
# The CUDA libraries a CUDA build of torch brings (a GPU user's environment): not part of the lock.
CUDA_PREFIXES = ("nvidia-", "cuda-")


def project_requirements() -> list[tuple[Requirement, str]]:
    """pyproject.toml's dependencies and those of every extra, each with the extra it came from ('' for none)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [(Requirement(r), "") for r in project["dependencies"]]
    for extra, items in project.get("optional-dependencies", {}).items():
        reqs += [(Requirement(r), extra) for r in items]
    return reqs


def _applies(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": extra})


def closure() -> tuple[dict[str, str], list[str]]:
    """{canonical name: installed version} of everything the project needs here, and what is missing."""
    found: dict[str, str] = {}
    missing: list[str] = []
    queue = [(r, extra) for r, extra in project_requirements() if _applies(r, extra)]
    seen: set[tuple[str, frozenset]] = set()
    while queue:
        req, _ = queue.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            missing.append(str(req))
            continue
        found[name] = dist.version
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if any(_applies(sub, e) for e in ("", *req.extras)):
                queue.append((sub, ""))
    return found, missing


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, ver = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}:{n}: expected NAME==VERSION, got {line!r}")
        pins[canonicalize_name(name)] = ver.strip()
    return pins


def differences(lock: dict[str, str]) -> list[str]:
    """What in this environment's closure differs from the lock (versions compared without local labels)."""
    found, missing = closure()
    out = [f"{r}: not installed" for r in missing]
    for name, ver in sorted(found.items()):
        if name.startswith(CUDA_PREFIXES):
            continue
        if name not in lock:
            out.append(f"{name} {ver}: installed and needed, but not in the lock")
        elif Version(ver).public != Version(lock[name]).public:
            out.append(f"{name}: installed {ver}, locked {lock[name]}")
    return out


def write() -> None:
    found, missing = closure()
    if missing:
        raise SystemExit("not installed here, so not lockable: " + ", ".join(missing) + " (install every extra first)")
    lines = [f"{name}=={Version(ver).public}" for name, ver in sorted(found.items()) if not name.startswith(CUDA_PREFIXES)]
    head = ("# Exact versions of lora-sdpo's dependencies and all its extras, as tested (Linux x86_64, Python 3.11).\n"
            "# Written by scripts/lock.py; install with `pip install -c requirements/lock.txt -e '.[test]'` (README).\n")
    LOCK.write_text(head + "\n".join(lines) + "\n")
    print(f"{LOCK.relative_to(ROOT)}: {len(lines)} packages")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare this environment with the lock instead of writing it")
    a = ap.parse_args()
    if not a.check:
        write()
        return
    diff = differences(read_lock())
    print("\n".join(diff) if diff else f"this environment matches {LOCK.relative_to(ROOT)}")
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
