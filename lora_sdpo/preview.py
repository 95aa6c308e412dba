"""`lora-sdpo data`: the normalised pairs of a file, a folder or a recipe's step, exactly as training reads
them, with the formats recognised, the rows dropped and why, and the counts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .data import PairSet, SourceReport, load_pairs, load_step_pairs
from .errors import DataError, RecipeError
from .recipe import DataConfig, SourceConfig, load_recipe


@dataclass
class Preview:
    title: str  # "step 1 of recipes/two_step.toml" or the source itself
    pairs: PairSet
    max_bad_fraction: float


def parse_columns(text: str | None) -> dict[str, str] | None:
    """--columns prompt=context,chosen=answer_w -> {"prompt": "context", "chosen": "answer_w"}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise DataError(f"--columns {text!r}: {item!r} is not NAME=KEY (e.g. --columns prompt=context,chosen=answer_w)")
        out[k.strip()] = v.strip()
    return out


def is_recipe(source: str) -> bool:
    return Path(source).suffix.lower() == ".toml"


def previews(source: str, step: int | None = None, columns: str | None = None, pairs_from: str | None = None,
             split: str = "train", rule: dict | None = None, overrides: tuple[str, ...] = (), ignore: str | None = None,
             templated: str | None = None) -> list[Preview]:
    if is_recipe(source):
        if columns or pairs_from or rule or ignore or templated:
            raise DataError(f"{source}: --columns, --ignore, --templated and --pairs-from (and its options) are for a data "
                            "file; in a recipe, set `columns`, `ignore`, `templated` and `pairs_from` in its [[steps.sources]]")
        loaded = load_recipe(source, overrides)
        n = len(loaded.recipe.steps)
        if step is not None and not 1 <= step <= n:
            raise RecipeError(f"{source}: --step {step}: the recipe has steps 1 to {n}")
        frac = loaded.recipe.data.max_bad_fraction
        return [Preview(f"step {i + 1} of {source}", load_step_pairs(loaded, i), frac)
                for i in ([step - 1] if step is not None else range(n))]
    if step is not None:
        raise DataError(f"--step is for a recipe (RECIPE.toml --step T); {source} is data")
    if not Path(source).exists():
        raise DataError(f"{source}: no such file or folder")
    from pydantic import ValidationError

    try:
        keys = [k.strip() for k in ignore.split(",") if k.strip()] if ignore else None
        src = SourceConfig(path=source, split=split, columns=parse_columns(columns), pairs_from=pairs_from, ignore=keys,
                           templated=templated or "refuse", **(rule or {}))
    except ValidationError as e:
        raise DataError(f"{source}: " + "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
    # every row is shown with its fate; the recipe's budget for bad rows is reported, not applied
    return [Preview(source, load_pairs([src], None, max_bad_fraction=1.0), DataConfig().max_bad_fraction)]


def report_lines(p: Preview) -> list[str]:
    out = [p.title]
    for rep in p.pairs.reports:
        out.append(f"  source {rep.summary()}")
        out.append("  formats: " + ", ".join(f"{k} ({v} rows)" for k, v in rep.formats.most_common()))
        out.append("  keys used: " + (", ".join(rep.keys.used) or "(none)"))
        if rep.keys.unused:
            out.append("  keys not used: " + ", ".join(f"{k} ({why})" for k, why in rep.keys.unused.items()))
        if rep.keys.ignored:
            out.append("  keys ignored (the source's ignore): " + ", ".join(rep.keys.ignored))
        if p.title == rep.label and len(rep.bad) > p.max_bad_fraction * rep.total:
            out.append(f"  note: {len(rep.bad)} of {rep.total} rows are bad: a recipe with data.max_bad_fraction = "
                       f"{p.max_bad_fraction} (the default) refuses this source")
    return out


def _text(v, width: int = 400) -> str:
    s = v if len(v) <= width else v[:width] + f" ... ({len(v) - width} more characters)"
    return s.replace("\n", "\n      ")


def _messages(part) -> list[str]:
    if isinstance(part, str):
        return [f"    (text) {_text(part)}"]
    return [f"    {m['role']}: {_text(m['content'])}" for m in part]


def pair_lines(i: int, row: dict) -> list[str]:
    out = [f"pair {i} ({row['source']} row {row['row']})", "  prompt:"]
    out += _messages(row["prompt"])
    for k in ("chosen", "rejected"):
        out += [f"  {k}:", *_messages(row[k])]
    return out


def json_line(row: dict) -> str:
    return json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected", "tools", "source", "row") if k in row}, ensure_ascii=False)


def reports_of(previews_: list[Preview]) -> list[SourceReport]:
    return [r for p in previews_ for r in p.pairs.reports]
