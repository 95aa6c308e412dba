"""Padding in DPO batches on the shipped data: random order (TRL's default) vs length-grouped batches.

TRL's preference collator stacks the B chosen and B rejected sequences of a batch (prompt +
completion, cut at max_length) and pads all 2B to the longest. The padded share is the compute a
batch spends on nothing. This replays the samplers over the real token lengths (the phi-3 chat
template of the pico model) without training:

- random: `torch.randperm`, what transformers' RandomSampler draws;
- grouped: transformers' `get_length_grouped_indices` (its LengthGroupedSampler: random
  mega-batches of up to 50 effective batches, each sorted by length), keyed on the padded width
  of a pair, max(prompt+chosen, prompt+rejected) cut at max_length.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/padding.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_sdpo.data import load_step_pairs, token_lengths  # noqa: E402
from lora_sdpo.model import load_tokenizer  # noqa: E402
from sidecar import Sidecar  # noqa: E402
from lora_sdpo.recipe import load_recipe  # noqa: E402

# (label, overrides of recipes/quickstart.toml)
SETTINGS = [
    ("quickstart (64 pairs/step, batch 8, max_length 256)", []),
    (
        "all shipped rows, batch 8, max_length 256",
        ["steps.0.sources.0.limit=100000", "steps.1.sources.0.limit=100000"],
    ),
    (
        "all shipped rows, two_step batching (4 x 4 accumulation), max_length 1024",
        [
            "steps.0.sources.0.limit=100000",
            "steps.1.sources.0.limit=100000",
            "training.per_device_train_batch_size=4",
            "training.gradient_accumulation_steps=4",
            "training.max_length=1024",
        ],
    ),
]


def padded_fraction(order: list[int], widths: list[tuple[int, int]], batch: int) -> tuple[int, int]:
    """(padded tokens, all tokens) over the batches of `order`; widths are (chosen, rejected) lengths."""
    pad = total = 0
    for i in range(0, len(order), batch):
        seqs = [w for j in order[i : i + batch] for w in widths[j]]
        top = max(seqs)
        total += top * len(seqs)
        pad += sum(top - s for s in seqs)
    return pad, total


def measure(overrides: list[str], seeds: int) -> list[dict]:
    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml", overrides)
    t = recipe.recipe.training
    tok = load_tokenizer(recipe.model_location())
    out = []
    for step in range(len(recipe.recipe.steps)):
        pairs = load_step_pairs(recipe, step)
        lens = token_lengths(pairs.rows, tok)
        widths = [(min(c, t.max_length), min(r, t.max_length)) for _, c, r in lens]
        key = [max(w) for w in widths]
        res = {"random": [], "grouped": []}
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            rand = torch.randperm(len(key), generator=g).tolist()
            g = torch.Generator().manual_seed(seed)
            grouped = get_length_grouped_indices(key, t.per_device_train_batch_size * t.gradient_accumulation_steps, generator=g)
            for name, order in (("random", rand), ("grouped", grouped)):
                res[name].append(padded_fraction(order, widths, t.per_device_train_batch_size))
        out.append(
            {
                "step": step + 1,
                "pairs": len(key),
                **{f"{k}_pad": statistics.fmean(p / tot for p, tot in v) for k, v in res.items()},
                # tokens the model processes, grouped / random: the compute the grouping saves
                "tokens_ratio": statistics.fmean(tot for _, tot in res["grouped"]) / statistics.fmean(tot for _, tot in res["random"]),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20, help="shuffles averaged per setting")
    p.add_argument("--quick", action="store_true", help="only the quickstart setting")
    a = p.parse_args()
    car = Sidecar("padding-quick" if a.quick else "padding")
    rows = []
    for label, overrides in SETTINGS[:1] if a.quick else SETTINGS:
        car.figures[label] = measure(overrides, a.seeds)
        for r in car.figures[label]:
            print(
                f"padding | {label} | step {r['step']} ({r['pairs']} pairs) | padded share random {r['random_pad']:.3f}, "
                f"length-grouped {r['grouped_pad']:.3f} | tokens processed grouped/random {r['tokens_ratio']:.3f}"
            )
            rows.append([label if r["step"] == 1 else "", f"{r['step']} ({r['pairs']} pairs)", f"{r['random_pad']:.3f}",
                         f"{r['grouped_pad']:.3f}", f"{r['tokens_ratio']:.3f}"])
    car.table(f"mean of {a.seeds} shuffles", ["data and batching", "step", "padded share, random", "padded share, grouped",
                                              "tokens processed, grouped / random"], rows)
    widest = car.figures[SETTINGS[-1][0]] if not a.quick else car.figures[SETTINGS[0][0]]
    car.headline = (f"padded share {min(r['random_pad'] for r in widest):.0%}-{max(r['random_pad'] for r in widest):.0%} random, "
                    f"{min(r['grouped_pad'] for r in widest):.0%}-{max(r['grouped_pad'] for r in widest):.0%} length-grouped "
                    f"({'quickstart' if a.quick else 'max_length 1024'}); tokens processed "
                    f"{min(r['tokens_ratio'] for r in widest):.2f}-{max(r['tokens_ratio'] for r in widest):.2f}x")
    car.save()


if __name__ == "__main__":
    main()
