"""Streamed LoRA merge: W' = W + scale * B @ A, one tensor at a time, in float32.

The base is read tensor by tensor (safetensors `safe_open`), so peak memory is about one output
shard plus the adapter, not the model. The sum is formed in float32 before any cast: a DPO update
is 1e-4..1e-2 of |W| and would not survive a bf16 (or NF4) rounding in between (DESIGN.md 3).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import MergeError
from .rundir import atomic_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order. Pickled weights are refused."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    pickles = [p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise MergeError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); lora-sdpo loads safetensors only. "
            "Convert them first (e.g. load and save_pretrained(safe_serialization=True) in a trusted environment)."
        )
    raise MergeError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern matches a module whose name ends with it (on a dot boundary).
    for pat, val in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return val
    return default


def load_lora(adapter_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]]:
    """(config, {base weight name: (A, B, scale, fan_in_fan_out)}) of a PEFT LoRA adapter folder."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise MergeError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {cfg.get('peft_type')} cannot be merged exactly; only LoRA is supported")
    if cfg.get("use_dora"):
        raise MergeError(f"{adapter_dir}: DoRA adapters are not supported by the streamed merge")
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.exists():
        raise MergeError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapters are refused)")
    tensors = load_file(weights_path)
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    fan_in_fan_out = cfg.get("fan_in_fan_out", False)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, r0)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
        scale = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
        pairs[f"{module}.weight"] = (a, b, scale, fan_in_fan_out)
    return cfg, pairs


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    d = scale * (b.to(torch.float32) @ a.to(torch.float32))
    return d.T if fan_in_fan_out else d


class ShardWriter:
    """Buffers tensors up to a size, writes numbered shards, then names them and writes the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max = Path(out_dir), max_shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max:
            self.flush()
        self.buf[name] = t.contiguous()
        self.buf_bytes += n
        self.total += n

    def flush(self) -> None:
        if not self.buf:
            return
        path = self.out_dir / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.buf, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.out_dir / "model.safetensors")
            return
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise MergeError(f"size {text!r}: use e.g. 200MB or 2GB")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer and licence files: everything that is not weights."""
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != "model.safetensors.index.json":
            shutil.copy2(p, dst / p.name)


def merge_lora(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "float32",
    max_shard_size: str | int = "2GB",
) -> dict:
    """Merge a LoRA adapter into a safetensors base, streamed; returns {merged, copied} tensor counts."""
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    if out_dir == base_dir or base_dir in out_dir.parents:
        raise MergeError(f"--output {out_dir} is inside the base model folder {base_dir}; choose another folder")
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    files = weight_files(base_dir)
    cfg, deltas = load_lora(adapter_dir)
    pending = dict(deltas)
    merged = copied = 0
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for f in files:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    w = sf.get_tensor(name)
                    if name in pending:
                        a, b, scale, fan = pending.pop(name)
                        w = (w.to(torch.float32) + lora_delta(a, b, scale, fan)).to(DTYPES[dtype])
                        merged += 1
                    else:
                        w = w.to(DTYPES[dtype]) if w.is_floating_point() else w
                        copied += 1
                    writer.add(name, w)
        if pending:
            raise MergeError(
                f"{adapter_dir}: {len(pending)} adapted weights are not in the base "
                f"(e.g. {next(iter(pending))}); is this adapter for another model?"
            )
        writer.close()
        copy_side_files(base_dir, tmp)
        config_path = tmp / "config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            config["dtype"] = dtype
            config.pop("torch_dtype", None)
            config.pop("quantization_config", None)
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"merged": merged, "copied": copied, "lora_config": cfg}
