"""The run directory and its manifest; every write is atomic (temporary name, fsync, rename).

    RUN/
      recipe.toml        the recipe as run (with overrides applied)
      manifest.json      written atomically after every stage; the truth for resume
      step-N/data/       pairs.jsonl (the rows of D_t), ref_logps.safetensors, hf_cache/ (TRL's cache)
      step-N/adapter/    PEFT adapter (safetensors)
      step-N/model/      M_N shards + index (float32: the chain's full-precision truth)
      step-N/metrics.jsonl
      step-N/ranks.json  per process: the pairs it trained on, per optimizer step (fingerprints)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import RunError

TMP_MARK = ".tmp-"
EXPORT_MARKER = "export.json"  # written last into a finished export (export.py, gguf_export.py): the file list


def is_run_dir(path: str | Path) -> bool:
    """A folder `lora-sdpo run` wrote (it holds manifest.json), not an export of one."""
    return (Path(path) / "manifest.json").is_file() and not (Path(path) / EXPORT_MARKER).exists()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes_if_changed(path: Path, data: bytes) -> None:
    """As atomic_write_bytes, but a file that already holds exactly `data` is left untouched (its
    modification time too: caches such as datasets' are keyed on it)."""
    path = Path(path)
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a line torn by a kill in the middle of an append is left out."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` whole, on failure it is removed.

    A reader sees either the old folder or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f"{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(root: Path) -> None:
    """Leftovers of an interrupted write are never read; clear them when a run resumes."""
    for p in sorted(Path(root).rglob(f"*{TMP_MARK}*"), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@dataclass
class RunDir:
    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.toml"

    def step(self, index: int) -> Path:
        """Folder of step `index` (1-based, as in the paper's D_t and M_t)."""
        return self.root / f"step-{index}"

    def data_dir(self, index: int) -> Path:
        return self.step(index) / "data"

    def adapter_dir(self, index: int) -> Path:
        return self.step(index) / "adapter"

    def model_dir(self, index: int) -> Path:
        return self.step(index) / "model"

    def metrics_path(self, index: int) -> Path:
        return self.step(index) / "metrics.jsonl"

    def rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.root))


# ----------------------------------------------------------------------------- integrity


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: what the manifest records of A_t and M_t."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def verify_files(folder: Path, hashes: dict[str, str] | None) -> str | None:
    """None when `folder` holds exactly the files the manifest recorded, else what is wrong."""
    if not hashes:
        return "the manifest records no file hashes for it"
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is missing"
    for rel, digest in hashes.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        if sha256_file(p) != digest:
            return f"{p} does not match the manifest's sha256 (damaged or changed)"
    return None


def ensure_free_space(folder: Path, need: int, what: str, error=None) -> None:
    """Stop before writing `need` bytes into `folder` when the disk cannot hold them."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need:
        raise (error or RunError)(
            f"{what} needs {_gb(need)} on {p}, but only {_gb(free)} is free; free at least "
            f"{_gb(need - free)} there (or put the run on another disk with --output) and run the same command again"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
