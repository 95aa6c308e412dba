"""Samples of what S and every M_t write, for the report (`diagnostics.samples`).

The run generates them while the models are loaded anyway (step.py): S through step 1's model with
the adapter disabled (exactly NF4(S)), M_t through NF4(M_t) as the retention check loads it after
the merge. Greedy completions of the first N held-out prompts (`data.eval`), one prompt at a time.
The full texts go to RUN/samples.json (written atomically after each model); report.md shows them
side by side, truncated, and is rebuilt from that file without a model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .generate import Settings, complete
from .rundir import atomic_write_json
from .targets import model_order

FILE = "samples.json"
SHOWN_CHARS = 300  # per completion in report.md; samples.json keeps the whole text


class SampleLog:
    """RUN/samples.json: the prompts, the settings, and each model's completions."""

    def __init__(self, root: Path, prompts: list, sources: list[str], max_new_tokens: int, weights: str):
        self.path = Path(root) / FILE
        self.settings = Settings(max_new_tokens=max_new_tokens)
        self.weights = weights
        head = {"prompts": prompts, "sources": sources, "max_new_tokens": max_new_tokens, "decoding": "greedy"}
        old = _read(self.path)
        # Completions of other prompts or settings (a changed recipe after --restart) do not carry over.
        same = old is not None and all(old.get(k) == v for k, v in head.items())
        self.doc = old if same else {**head, "models": {}}

    @property
    def active(self) -> bool:
        return bool(self.doc["prompts"])

    def wanted(self, label: str) -> bool:
        return self.active and label not in self.doc["models"]

    def record(self, label: str, model, tokenizer) -> float:
        """Generate `label`'s completions with `model`, store them; returns the seconds it took."""
        if not self.active:
            return 0.0
        t = time.perf_counter()
        texts = complete(model, tokenizer, self.doc["prompts"], self.settings)
        seconds = time.perf_counter() - t
        models = {**self.doc["models"], label: {"completions": texts, "weights": self.weights.format(label=label),
                                                "seconds": round(seconds, 2)}}
        self.doc["models"] = dict(sorted(models.items(), key=lambda kv: model_order(kv[0])))  # S, M_1, ... whatever the phase order
        atomic_write_json(self.path, self.doc)
        return seconds


def for_run(run_root: Path, recipe, eval_pairs) -> SampleLog | None:
    """The run's sample log, or None when diagnostics.samples is 0 or there is no held-out data."""
    d = recipe.recipe.diagnostics
    if not d.samples or eval_pairs is None or not eval_pairs.rows:
        return None
    rows = eval_pairs.rows[: d.samples]
    a = recipe.adapter
    weights = ("NF4({label}), " if a.quantization == "nf4" else "{label}, ") + f"{a.compute_dtype} compute"
    return SampleLog(run_root, [r["prompt"] for r in rows], [f"{r['source']} row {r['row']}" for r in rows],
                     d.sample_tokens, weights)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _one_line(text: str, n: int) -> str:
    flat = " ".join(text.split())  # the table cell: one line
    flat = flat if len(flat) <= n else flat[: n - 3].rstrip() + "..."
    return flat.replace("|", "\\|") or "(empty)"


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def report_section(root: Path) -> list[str]:
    """report.md's samples: for each prompt, every model's completion side by side (truncated)."""
    doc = _read(Path(root) / FILE)
    if not doc or not doc.get("models"):
        return []
    labels = sorted(doc["models"], key=model_order)
    weights = "; ".join(f"{label}: {doc['models'][label]['weights']}" for label in labels)
    seconds = sum(doc["models"][label].get("seconds", 0) for label in labels)
    parts = [
        "\n## Samples: what the models write\n",
        f"Greedy completions (at most {doc['max_new_tokens']} new tokens, the chat template applied) of the first "
        f"{len(doc['prompts'])} held-out prompts, cut to {SHOWN_CHARS} characters here; the full texts are in "
        f"[`{FILE}`]({FILE}). Weights: {weights}. Generating them took {seconds:.1f} s in all.\n",
    ]
    for i, prompt in enumerate(doc["prompts"]):
        source = doc["sources"][i] if i < len(doc.get("sources", [])) else ""
        parts.append(f"**Prompt {i + 1}** ({source}): {_one_line(prompt_text(prompt), SHOWN_CHARS)}\n")
        parts.append("| model | completion |\n|---|---|")
        parts += [f"| {label} | {_one_line(doc['models'][label]['completions'][i], SHOWN_CHARS)} |" for label in labels]
        parts.append("")
    return parts
