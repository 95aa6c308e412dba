"""gamma = log pi(y_w|x) - log pi(y_l|x): what the sDPO paper measures about its reference models.

A reference with a higher mean gamma on D_t sets a stricter lower bound for step t (Kim et al.
2024, Fig. 2); a reference whose gamma on data is far above the SFT base's has probably been
trained on that data (the paper's M_2 case). The numbers here go through the same tokenisation
(TRL's helpers) and the same fused log-prob path as training, so they mean what the trainer's do.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save

from .data import load_pairs, tokenize_pair
from .fetch import local_model_dir
from .manifest import Manifest
from .model import load_base, load_tokenizer, sequence_logps
from .recipe import AdapterConfig, SourceConfig
from .rundir import atomic_write_bytes

# A gamma gain over S this large, in units of S's spread on the data, is what a model that
# trained on the data shows; the paper's M_2 jumps from -25 to +84 on its own training data.
SEEN_DATA_SPREAD = 1.0


def gammas(model, tokenized: list[dict], tokenizer, max_length: int, batch_size: int = 8,
           prefix_sharing: bool = True) -> torch.Tensor:
    """Per-pair gamma of `model` (a PEFT model counts with its adapter on)."""
    if not tokenized:
        return torch.empty(0)
    chosen, rejected = sequence_logps(model, tokenized, tokenizer.pad_token_id, max_length, batch_size, prefix_sharing)
    return chosen - rejected


def stats(g: torch.Tensor) -> dict:
    xs = [float(x) for x in g]
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else None,
        "median": statistics.median(xs) if xs else None,
        "std": std,
        "se": std / math.sqrt(len(xs)) if len(xs) > 1 else None,  # standard error of the mean
        "frac_positive": sum(x > 0 for x in xs) / len(xs) if xs else None,
    }


# ----------------------------------------------------------------------------- the gamma matrix's per-pair values
# Each row of the gamma matrix (S, M_1, ...) keeps its per-pair gammas, one tensor per dataset
# (the first diagnostics.gamma_sample pairs of D_t, in the order of step-t/data/pairs.jsonl, and of
# the eval data), so that a report can rebuild every statistic, the paired ones included, without a model.
GAMMA_DIR = "gamma"


def gamma_file(root: Path, model: str) -> Path:
    return Path(root) / GAMMA_DIR / f"{model}.safetensors"


def save_gammas(path: Path, per_dataset: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save({k: v.detach().float().contiguous() for k, v in per_dataset.items()}))


def load_gammas(root: Path, model: str) -> dict[str, torch.Tensor] | None:
    path = gamma_file(root, model)
    return load_file(path) if path.is_file() else None


def paired_difference(g_ref: torch.Tensor, g_base: torch.Tensor) -> dict:
    """gamma_ref - gamma_base on the same pairs: mean, its standard error, and the share of pairs above 0.

    Pairing removes what the two models share (how hard each pair is), which is most of gamma's
    spread; the standard error of the difference is what says whether one reference is stricter.
    """
    if len(g_ref) != len(g_base):
        raise ValueError(f"paired difference of {len(g_ref)} and {len(g_base)} pairs; both need the same pairs")
    d = [float(a) - float(b) for a, b in zip(g_ref, g_base)]
    n = len(d)
    return {
        "n": n,
        "mean": statistics.fmean(d) if d else None,
        "se": statistics.stdev(d) / math.sqrt(n) if n > 1 else None,
        "frac_positive": sum(x > 0 for x in d) / n if d else None,
    }


def paired_differences(root: Path, m: Manifest) -> list[dict]:
    """For every step t: the paper's comparison, gamma of the step's reference M_{t-1} minus gamma of S on D_t's
    sample (for t = 1 the reference is S itself). From the per-pair files; missing ones give no numbers."""
    base = load_gammas(root, "S")
    out = []
    for s in m.steps:
        t, ref = s.index, s.reference_label
        entry = {"step": t, "reference": ref, "data": f"D_{t}"}
        g_ref = base if t == 1 else load_gammas(root, ref)
        if t > 1 and base is not None and g_ref is not None and entry["data"] in base and entry["data"] in g_ref:
            entry.update(paired_difference(g_ref[entry["data"]], base[entry["data"]]))
        out.append(entry)
    return out


def compare(g_model: torch.Tensor, g_against: torch.Tensor) -> dict:
    """The implicit-reward view: how often and by how much the model prefers y_w more than `against` does."""
    d = g_model - g_against
    return {
        "frac_model_above": float((d > 0).float().mean()),
        "mean_difference": float(d.mean()),
        "against_mean": float(g_against.mean()),
    }


def seen_data_warning(g_model: torch.Tensor, g_base: torch.Tensor) -> str | None:
    """Say so when a candidate reference's gamma sits far above the base's on the data (paper's M_2)."""
    if len(g_base) < 2:
        return None
    spread = float(g_base.std())
    gain = float(g_model.mean() - g_base.mean())
    if spread > 0 and gain > SEEN_DATA_SPREAD * spread:
        return (
            f"mean gamma is {gain:.2f} above the base's ({gain / spread:.1f} of the base's spread): this model has "
            "probably been trained on this data; as a reference for it, it sets a bound the policy can hardly beat "
            "and teaches little (Kim et al. 2024, sec. 4.2). Prefer data it has not seen."
        )
    return None


def measure(
    model_path: str,
    data_specs: list[str],
    adapter: str | None = None,
    against: str | None = None,
    limit: int | None = None,
    max_length: int = 1024,
    quantization: str = "nf4",
    compute_dtype: str = "float32",
) -> dict:
    """`lora-sdpo gamma`: gamma statistics of a model (and optionally a second one) per data source."""
    preset = AdapterConfig(quantization=quantization, compute_dtype=compute_dtype)
    model_dir = local_model_dir(model_path)
    tokenizer = load_tokenizer(model_dir)
    sources = {}
    for spec in data_specs:
        src = _source(spec, limit)
        pairs = load_pairs([src], None, max_bad_fraction=1.0)
        sources[src.label] = ([tokenize_pair(r, tokenizer) for r in pairs.rows], pairs.reports[0].summary())

    def run_model(path: str, adapter_dir: str | None) -> dict[str, torch.Tensor]:
        model = load_base(local_model_dir(path), preset)
        if adapter_dir:
            model = PeftModel.from_pretrained(model, adapter_dir)
        out = {label: gammas(model, rows, tokenizer, max_length) for label, (rows, _) in sources.items()}
        del model
        return out

    g = run_model(model_path, adapter)
    g_against = run_model(against, None) if against else {}
    result = {"model": model_path, "adapter": adapter, "against": against, "max_length": max_length,
              "quantization": quantization, "sources": {}}
    for label, (_, summary) in sources.items():
        entry = {"data": summary, **stats(g[label])}
        if against:
            entry["against"] = compare(g[label], g_against[label])
            warning = seen_data_warning(g[label], g_against[label])
            if warning:
                entry["warning"] = warning
        result["sources"][label] = entry
    return result


def _source(spec: str, limit: int | None):
    if Path(spec).exists():
        return SourceConfig(path=str(Path(spec).resolve()), limit=limit)
    name, _, split = spec.partition(":")
    return SourceConfig(dataset=name, split=split or "train", limit=limit)
