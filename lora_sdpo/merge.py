"""Streamed LoRA merge: W' = W + scale * B @ A, one tensor at a time, in float32.

The base is read tensor by tensor and the output shards are planned before any data is read
(lora_sdpo/shards.py), so peak memory is about the largest tensor, not the model or a shard. The
sum is formed in float32 before any cast: a DPO update is 1e-4..1e-2 of |W| and would not survive
a bf16 (or NF4) rounding in between (docs/design.md, section 5).

What a PEFT LoRA adapter can hold, and what the merge does with it:
- `lora_A`/`lora_B` (Linear, Conv1D with fan_in_fan_out): delta = scale * B @ A;
  `lora_embedding_A`/`_B` (nn.Embedding): delta = scale * (B @ A).T, as PEFT's Embedding layer.
  scale = alpha / r, or alpha / sqrt(r) with rsLoRA, with r and alpha from rank/alpha_pattern.
- `modules_to_save` (saved as plain `<module>.weight`): the trained full tensor replaces the base's.
- `<module>.base_layer.weight`: PEFT's copy of a targeted embedding's frozen weight; the base's own
  (full-precision) tensor is used, after checking the shapes agree.
- Tied input/output embeddings: the merged model must compute what the adapter model computed. A
  LoRA on only one of the two (or a trained copy of one) makes them differ, so the output unties
  them (writes lm_head.weight, sets tie_word_embeddings false). PEFT's merge_and_unload adds the
  delta to the shared tensor instead, which changes both and is not what was trained.
Anything else (DoRA, LoRA biases, layer replication, other PEFT types) cannot be merged by adding
B @ A and is refused by name.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import MergeError
from .rundir import atomic_dir, ensure_free_space
from .shards import OutTensor, RawCopy, model_tensors, plan_shards, read_rows, read_tensor, row_blocks, shard_sizes, weight_files, write_shards

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MERGE_BASES = ("original", "nf4-roundtrip")
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight")

# LoraConfig fields that change what the adapter computes beyond W + scale * B @ A.
UNMERGEABLE = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude",
    "lora_bias": "a bias on lora_B is not supported by the streamed merge",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "layer_replication": "layer replication changes the architecture",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens are not supported by the streamed merge",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routing mixes several adapters per token",
    "use_bdlora": "block-diagonal LoRA is not supported by the streamed merge",
    "kasa_config": "KaSA is not supported by the streamed merge",
    "velora_config": "VeLoRA is not supported by the streamed merge",
    "monteclora_config": "MonteCLoRA samples its update",
}
# Initialisations that rewrite the base weights: the adapter only fits the rewritten base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraFactor:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    kind: str  # "linear" or "embedding"
    fan_in_fan_out: bool = False

    @property
    def transposed(self) -> bool:
        return self.kind == "embedding" or self.fan_in_fan_out

    def delta(self) -> torch.Tensor:
        d = self.scale * (self.b.to(torch.float32) @ self.a.to(torch.float32))
        return d.T if self.transposed else d

    def delta_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of delta(), without forming the rest: a delta is as large as its weight."""
        a, b = self.a.to(torch.float32), self.b.to(torch.float32)
        if self.transposed:  # rows of (B @ A).T are columns of B @ A
            return self.scale * (a[:, r0:r1].T @ b.T)
        return self.scale * (b[r0:r1] @ a)


@dataclass
class WeightOp:
    """What the adapter does to one base tensor: replace it (modules_to_save), add LoRA deltas, or both."""

    replace: torch.Tensor | None = None
    factors: list[LoraFactor] = field(default_factory=list)
    shape_check: tuple[int, ...] | None = None  # shape of PEFT's saved base_layer copy


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches a module name that ends with it.
    for pat, val in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return val
    return default


def _check_config(adapter_dir: Path, cfg: dict) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {cfg.get('peft_type')} cannot be merged exactly; only LoRA is supported")
    if cfg.get("use_dora"):
        raise MergeError(f"{adapter_dir}: DoRA adapters are not supported by the streamed merge ({UNMERGEABLE['use_dora']})")
    bad = [f"{k} ({why})" for k, why in UNMERGEABLE.items() if cfg.get(k)]
    if bad:
        raise MergeError(f"{adapter_dir}/adapter_config.json: cannot merge exactly: {'; '.join(bad)}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise MergeError(
            f"{adapter_dir}/adapter_config.json: init_lora_weights = {init!r} rewrote the base weights at initialisation, "
            "so the adapter does not fit the original base; save it with PEFT's path_initial_model_for_weight_conversion "
            "to convert it to a plain LoRA first"
        )


def load_lora(adapter_dir: Path) -> tuple[dict, dict[str, WeightOp]]:
    """(config, {base tensor name: WeightOp}) of a PEFT LoRA adapter folder."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise MergeError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    _check_config(adapter_dir, cfg)
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.exists():
        raise MergeError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapters are refused)")
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(weights_path).items()}
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    ops: dict[str, WeightOp] = {}
    for key, t in tensors.items():
        for marker, kind in ((".lora_A.weight", "linear"), (".lora_embedding_A", "embedding")):
            if key.endswith(marker):
                module = key.removesuffix(marker)
                b_key = module + marker.replace("_A", "_B")
                if b_key not in tensors:
                    raise MergeError(f"{weights_path}: {key} has no matching {b_key}")
                if t.ndim != 2:
                    raise MergeError(f"{weights_path}: {key} is {t.ndim}-D (a convolution LoRA); only Linear and Embedding layers are merged")
                r = _pattern_value(cfg.get("rank_pattern") or {}, module, r0)
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
                scale = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
                factor = LoraFactor(t, tensors[b_key], scale, kind, bool(cfg.get("fan_in_fan_out")) and kind == "linear")
                ops.setdefault(f"{module}.weight", WeightOp()).factors.append(factor)
                break
        else:
            if ".lora_B.weight" in key or ".lora_embedding_B" in key:
                continue  # taken with its A
            if re.search(r"\.(lora_|trainable_tokens|magnitude)", key):
                raise MergeError(f"{weights_path}: {key} is not a LoRA A/B matrix; this kind of adapter cannot be merged exactly")
            # modules_to_save copies (older PEFT kept the wrapper's path in the key)
            name = re.sub(r"\.modules_to_save(\.default)?\.", ".", key)
            if ".base_layer." in name:
                name = name.replace(".base_layer.", ".")
                if name.endswith(".weight"):
                    ops.setdefault(name, WeightOp()).shape_check = tuple(t.shape)
                    continue
            ops.setdefault(name, WeightOp()).replace = t
    return cfg, ops


def nf4_roundtrip(w: torch.Tensor, double_quant: bool = True) -> torch.Tensor:
    """dequant(NF4(w)): the weight a QLoRA adapter saw in training (quantised from float32, as lora-sdpo loads it)."""
    # (bitsandbytes' missing-kernels line is dropped at its source, lora_sdpo/noise.py; its other warnings stay)
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.to(torch.float32), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).to(torch.float32)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise MergeError(f"size {text!r}: use e.g. 200MB or 2GB")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def side_files(src: Path) -> list[Path]:
    """Config, generation config, tokenizer and licence files: everything that is not weights."""
    return sorted(
        p for p in Path(src).iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != "model.safetensors.index.json"
    )


def copy_side_files(src: Path, dst: Path) -> None:
    for p in side_files(src):
        shutil.copy2(p, Path(dst) / p.name)


@dataclass
class MergePlan:
    """The output of a merge, fixed before any tensor is read: shard layout and what each tensor becomes."""

    base_dir: Path
    dtype: str
    merge_base: str
    sources: dict  # output name -> TensorInfo of the base tensor it starts from
    ops: dict[str, WeightOp]
    shards: list[list[OutTensor]]
    untie: bool
    lora_config: dict | None
    merged: list[str]
    replaced: list[str]


def _same_update(emb: WeightOp, head: WeightOp) -> bool:
    """True when the head's update equals the embedding's (ensure_weight_tying), so tying can stay."""
    if (emb.replace is None) != (head.replace is None) or len(emb.factors) != len(head.factors):
        return False
    if emb.replace is not None and not torch.equal(emb.replace, head.replace):
        return False
    for e, h in zip(emb.factors, head.factors):
        # the head's Linear LoRA is the embedding's with A and B swapped and transposed
        if e.scale != h.scale or e.kind != "embedding" or h.kind != "linear":
            return False
        if not (torch.equal(h.a, e.b.T) and torch.equal(h.b, e.a.T)):
            return False
    return True


def _tied(base_dir: Path) -> bool:
    cfg_path = base_dir / "config.json"
    if not cfg_path.exists():
        return False
    cfg = json.loads(cfg_path.read_text())
    return bool(cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)))


def plan_merge(
    base_dir: Path, adapter_dir: Path | None, dtype: str = "float32", max_shard_size: str | int = "2GB", merge_base: str = "original"
) -> MergePlan:
    """Check the adapter against the base and lay out the output; nothing heavier than headers is read."""
    base_dir = Path(base_dir)
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if merge_base not in MERGE_BASES:
        raise MergeError(f"merge base {merge_base!r}: choose one of {', '.join(MERGE_BASES)}")
    base = model_tensors(base_dir)
    cfg, ops = load_lora(adapter_dir) if adapter_dir is not None else (None, {})
    ops = dict(ops)
    sources = dict(base)

    # Tied embeddings: the input embedding is the truth; lm_head is written only when untied.
    untie = False
    if _tied(base_dir):
        emb = next((n for n in base if n.endswith(INPUT_EMBEDDING_SUFFIXES)), None)
        touched = [n for n, op in ops.items() if (op.factors or op.replace is not None) and n in (OUTPUT_EMBEDDING, emb)]
        if touched and emb is None:
            raise MergeError(
                f"{base_dir}: config ties the word embeddings but no input embedding tensor "
                f"(*{', *'.join(INPUT_EMBEDDING_SUFFIXES)}) was found; cannot merge an adapter on {touched[0]}"
            )
        sources.pop(OUTPUT_EMBEDDING, None)  # a stored copy of a tied head is ignored by transformers too
        if len(touched) == 2 and _same_update(ops[emb], ops[OUTPUT_EMBEDDING]):
            ops.pop(OUTPUT_EMBEDDING)  # PEFT's ensure_weight_tying: one update on the shared tensor
        elif touched:
            untie = True
            sources[OUTPUT_EMBEDDING] = base[emb]
        else:
            ops.pop(OUTPUT_EMBEDDING, None)  # only a shape-check copy

    missing = [n for n in ops if n not in sources]
    if missing:
        raise MergeError(
            f"{adapter_dir}: {len(missing)} adapted weights are not in the base {base_dir} "
            f"(e.g. {missing[0]}); is this adapter for another model?"
        )
    for name, op in ops.items():
        shape = sources[name].shape
        for got, what in ((op.shape_check, "saved base copy"), (None if op.replace is None else tuple(op.replace.shape), "trained copy")):
            if got is not None and got != shape:
                raise MergeError(
                    f"{adapter_dir}: the adapter's {what} of {name} has shape {got} but the base's is {shape}; "
                    "the adapter was trained on a resized vocabulary or another model. Resize the base the same way "
                    "(resize_token_embeddings), save it, and merge into that."
                )
        for f in op.factors:
            out, inn = (shape[1], shape[0]) if (f.kind == "embedding" or f.fan_in_fan_out) else shape
            if len(shape) != 2 or f.b.shape[0] != out or f.a.shape[1] != inn:
                raise MergeError(
                    f"{adapter_dir}: LoRA of {name} has A {tuple(f.a.shape)}, B {tuple(f.b.shape)}, which do not fit "
                    f"the base tensor {shape}; is this adapter for another model?"
                )

    target = DTYPES[dtype]
    order = list(base)  # file order keeps reads sequential
    if untie:
        order.insert(order.index(next(n for n in base if n.endswith(INPUT_EMBEDDING_SUFFIXES))) + 1, OUTPUT_EMBEDDING)
    outs = []
    for name in order:
        if name not in sources:
            continue
        info = sources[name]
        outs.append(OutTensor(name, target if info.is_float else info.torch_dtype, info.shape))
    merged = sorted(n for n, op in ops.items() if op.factors)
    replaced = sorted(n for n, op in ops.items() if op.replace is not None)
    return MergePlan(base_dir, dtype, merge_base, sources, ops, plan_shards(outs, parse_size(max_shard_size)), untie, cfg, merged, replaced)


def _produce(plan: MergePlan, t: OutTensor, double_quant: bool):
    """The output tensor `t`: raw bytes when unchanged, else float32 work done in row blocks."""
    info = plan.sources[t.name]
    op = plan.ops.get(t.name)
    if op is None and info.torch_dtype == t.dtype:
        return RawCopy(info)
    if op is not None and op.factors and plan.merge_base == "nf4-roundtrip" and _roundtripped(t.name, op):
        # NF4 quantises in blocks over the whole flattened tensor (and its scales again in blocks
        # of 256), so the round trip needs the tensor whole.
        w = nf4_roundtrip(op.replace if op.replace is not None else read_tensor(info), double_quant)
        for f in op.factors:
            w = w + f.delta()
        return w.to(t.dtype)
    return _row_blocks(info, op, t.dtype)


def _roundtripped(name: str, op: WeightOp) -> bool:
    # Only Linear layers other than the LM head are NF4 in QLoRA (bitsandbytes skips lm_head;
    # embeddings are never quantised), so only they are round-tripped.
    return name != OUTPUT_EMBEDDING and all(f.kind == "linear" for f in op.factors)


def _row_blocks(info, op: WeightOp | None, dtype: torch.dtype):
    # Peak memory is a block (~32 MB in float32) whatever the tensor's size: a 128k-vocabulary
    # LM head in float32 is 2 GB, and its delta as much again.
    for r0, r1 in row_blocks(info.shape):
        if op is not None and op.replace is not None:
            w = op.replace[r0:r1] if op.replace.ndim else op.replace
        else:
            w = read_rows(info, r0, r1)
        if op is not None and op.factors:
            w = w.to(torch.float32)
            for f in op.factors:
                w = w + f.delta_rows(r0, r1)
        yield w.to(dtype) if w.is_floating_point() else w


def config_text(src_dir: Path, dtype: str, untie: bool) -> str | None:
    """The output's config.json: the base's, with the stored dtype, no quantisation, and untied if needed."""
    path = Path(src_dir) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    if untie:
        config["tie_word_embeddings"] = False
    return json.dumps(config, indent=2) + "\n"


def write_merge(plan: MergePlan, dst: Path, double_quant: bool = True) -> list[str]:
    """Write the planned shards and config into an existing folder `dst` (no side files)."""
    names = write_shards(dst, plan.shards, lambda t: _produce(plan, t, double_quant))
    text = config_text(plan.base_dir, plan.dtype, plan.untie)
    if text is not None:
        (Path(dst) / "config.json").write_text(text)
    return names


def check_output(out_dir: Path, protected: dict[str, Path | None], replaceable: tuple[str, ...]) -> None:
    """Refuse an output folder that would overwrite an input, or a folder of something else.

    The output is written whole and replaces what is there (rundir.atomic_dir), so an existing
    folder is only replaced when it holds one of the `replaceable` files (an earlier output).
    """
    out_dir = Path(out_dir).resolve()
    for what, p in protected.items():
        if p is None:
            continue
        p = Path(p).resolve()
        if out_dir == p or p in out_dir.parents:
            raise MergeError(f"--output {out_dir} is inside the {what} folder {p}; choose another folder")
        if out_dir in p.parents:
            raise MergeError(f"--output {out_dir} contains the {what} folder {p} and would replace it; choose another folder")
    if out_dir.is_file():
        raise MergeError(f"--output {out_dir} is a file; choose a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not any((out_dir / n).exists() for n in replaceable):
        raise MergeError(f"--output {out_dir} exists and holds other files, which would be deleted; choose a new or empty folder")


def merge_lora(
    base_dir: Path,
    adapter_dir: Path | None,
    out_dir: Path,
    dtype: str = "float32",
    max_shard_size: str | int = "2GB",
    merge_base: str = "original",
    double_quant: bool = True,
) -> dict:
    """Merge a LoRA adapter into a safetensors base, streamed; with adapter_dir None, only cast and reshard.

    Returns {merged, replaced, copied, untied, lora_config}. The output folder is written atomically.
    """
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    check_output(out_dir, {"base model": base_dir, "adapter": adapter_dir}, replaceable=("config.json", "model.safetensors", "model.safetensors.index.json"))
    weight_files(base_dir)
    plan = plan_merge(base_dir, adapter_dir, dtype, max_shard_size, merge_base)
    side = sum(f.stat().st_size for f in side_files(base_dir))
    ensure_free_space(out_dir.parent, sum(shard_sizes(plan.shards)) + side, f"the merged model {out_dir}", MergeError)
    with atomic_dir(out_dir) as tmp:
        copy_side_files(base_dir, tmp)
        write_merge(plan, tmp, double_quant)
    n_out = sum(len(s) for s in plan.shards)
    return {
        "merged": len(plan.merged),
        "replaced": len(plan.replaced),
        "copied": n_out - len(plan.merged) - len(plan.replaced),
        "untied": plan.untie,
        "lora_config": plan.lora_config,
    }
