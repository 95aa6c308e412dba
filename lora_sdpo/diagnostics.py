"""gamma = log pi(y_w|x) - log pi(y_l|x): what the sDPO paper measures about its reference models.

A reference with a higher mean gamma on D_t sets a stricter lower bound for step t (Kim et al.
2024, Fig. 2); a reference whose gamma on data is far above the SFT base's has probably been
trained on that data (the paper's M_2 case). The numbers here go through the same tokenisation
(TRL's helpers) and the same fused log-prob path as training, so they mean what the trainer's do.
"""

from __future__ import annotations

import statistics

import torch

from .data import tokenize_pair
from .model import sequence_logps

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
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else None,
        "median": statistics.median(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "frac_positive": sum(x > 0 for x in xs) / len(xs) if xs else None,
    }


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
    from .data import load_pairs
    from .model import load_base, load_tokenizer
    from .recipe import AdapterConfig
    from .hub import local_model_dir

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
            from peft import PeftModel

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
    from pathlib import Path

    from .recipe import SourceConfig

    if Path(spec).exists():
        return SourceConfig(path=str(Path(spec).resolve()), limit=limit)
    name, _, split = spec.partition(":")
    return SourceConfig(dataset=name, split=split or "train", limit=limit)
