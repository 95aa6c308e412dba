"""Safetensors shards read and written one tensor at a time, without holding a shard in memory.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte offsets) and the raw tensor bytes. Because the header only needs shapes and dtypes,
an output shard's layout can be planned before any data is read: the writer emits the header
first, then streams each tensor's bytes as it is produced. A tensor that passes through unchanged
is copied file to file by the kernel (`os.copy_file_range`), never entering this process.

Reading uses positioned reads into a fresh buffer rather than `safe_open`'s memory map: pages of a
mapped multi-GB shard count towards the process's resident memory, which is what a streamed merge
exists to avoid.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from . import faults
from .errors import MergeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, and what it is."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ST_DTYPES:
            raise MergeError(f"{self.file}: tensor {self.name} has dtype {self.dtype}, which lora-sdpo cannot read")
        return ST_DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, in the order of their bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MergeError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise MergeError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    base = 8 + n
    out = [
        TensorInfo(name, path, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0], h["data_offsets"][1] - h["data_offsets"][0])
        for name, h in header.items()
        if name != "__metadata__"
    ]
    return sorted(out, key=lambda t: t.start)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order. Pickled weights are refused."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise MergeError(f"{index} names {', '.join(missing)}, which is missing; download the model again")
        return [model_dir / n for n in names]
    single = model_dir / SINGLE_NAME
    if single.exists():
        return [single]
    pickles = [p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise MergeError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); lora-sdpo loads safetensors only. "
            "Convert them first (e.g. load and save_pretrained(safe_serialization=True) in a trusted environment)."
        )
    raise MergeError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}")


def model_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder by name, in file order then byte order."""
    out: dict[str, TensorInfo] = {}
    for f in weight_files(model_dir):
        for t in read_header(f):
            out[t.name] = t
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    return read_rows(info, 0, info.shape[0] if info.shape else 1).reshape(info.shape)


def read_rows(info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 (along the first dimension) of a stored tensor; rows are contiguous on disk."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    n = (r1 - r0) * row_bytes
    buf = torch.empty(n, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.start + r0 * row_bytes)
        if n and f.readinto(buf.numpy()) != n:
            raise MergeError(f"{info.file}: truncated at tensor {info.name}; download the model again")
    return buf.view(info.torch_dtype).reshape((r1 - r0, *info.shape[1:]) if info.shape else ())


def row_blocks(shape: tuple[int, ...], block_bytes: int = 32 * 2**20, element_size: int = 4) -> list[tuple[int, int]]:
    """Row ranges of about block_bytes each (in float32), so a tensor of any size is worked on in pieces."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    row = element_size
    for s in shape[1:]:
        row *= s
    step = max(1, block_bytes // max(row, 1))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, dtype and shape are fixed before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RawCopy:
    """Bytes to copy unchanged from a source file: the tensor passes through this process untouched."""

    info: TensorInfo


def plan_shards(tensors: Iterable[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Pack tensors into shards in order, starting a new shard when the next would exceed the limit."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header_bytes(shard: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    return struct.pack("<Q", len(raw)) + raw


def shard_sizes(shards: list[list[OutTensor]]) -> list[int]:
    """The exact byte size of each planned shard file (for a dry run)."""
    return [len(_header_bytes(s)) + sum(t.nbytes for t in s) for s in shards]


def write_shards(
    out_dir: Path, shards: list[list[OutTensor]], produce: Callable[[OutTensor], torch.Tensor | RawCopy | Iterator[torch.Tensor]]
) -> list[str]:
    """Write the planned shards (and the index when there are several).

    `produce` gives each tensor in turn: whole, as its row blocks in order, or as a RawCopy.
    """
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        with open(Path(out_dir) / name, "wb") as f:
            f.write(_header_bytes(shard))
            for t in shard:
                data = produce(t)
                if isinstance(data, RawCopy):
                    _copy_range(data.info, f)
                    continue
                written = 0
                for piece in [data] if isinstance(data, torch.Tensor) else data:  # a tensor, or its row blocks in order
                    if piece.dtype != t.dtype:
                        raise AssertionError(f"{t.name}: produced {piece.dtype}, planned {t.dtype}")
                    f.write(piece.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    written += piece.numel() * piece.element_size()
                    del piece
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: produced {written} bytes, planned {t.nbytes} ({t.shape})")
                del data
        faults.point("merge")
    if len(names) > 1:
        (Path(out_dir) / INDEX_NAME).write_text(index_json(shards))
    return names


def index_json(shards: list[list[OutTensor]]) -> str:
    """The text of model.safetensors.index.json for the planned shards (only written when there are several)."""
    names = shard_names(len(shards))
    weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
    total = sum(t.nbytes for s in shards for t in s)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"


def planned_files(shards: list[list[OutTensor]]) -> dict[str, int]:
    """{file name: exact size in bytes} of what write_shards will write."""
    out = dict(zip(shard_names(len(shards)), shard_sizes(shards)))
    if len(shards) > 1:
        out[INDEX_NAME] = len(index_json(shards).encode())
    return out


def _copy_range(info: TensorInfo, dst) -> None:
    dst.flush()
    with open(info.file, "rb") as src:
        offset, left = info.start, info.nbytes
        while left:
            try:
                n = os.copy_file_range(src.fileno(), dst.fileno(), left, offset)
            except OSError:  # another filesystem or an old kernel: copy through a small buffer
                src.seek(offset)
                n = dst.write(src.read(min(left, 64 * 2**20)))
                dst.flush()
            if n == 0:
                raise MergeError(f"{info.file}: truncated at tensor {info.name}; download the model again")
            offset += n
            left -= n
    dst.seek(0, os.SEEK_END)
