"""How D_1..D_T are formed from the recipe's data (the paper leaves "how to define D_t" open).

- natural: each step's own sources (the paper's choice: one dataset per step).
- stratified: the paper's "sDPO Strat.": the union of all steps' pairs, re-cut into T parts by
  `data.fractions`, each source split in the same proportions (seeded).
- curriculum: the union ranked by the SFT base's gamma margin, easiest (highest gamma_S) first,
  cut into T parts by `data.fractions`.
The fractions default to the natural steps' sizes, so the arms of a comparison see the same
number of pairs per step and differ only in which pairs.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from typing import Callable

from .pairset import PairSet  # data.py calls the splits; a split only regroups the PairSets it is given


def step_sizes(total: int, fractions: list[float]) -> list[int]:
    """Sizes that add up to `total`: each rounded down, the remainder to the last step."""
    sizes = [int(total * f) for f in fractions[:-1]]
    return sizes + [total - sum(sizes)]


def composition(ps: PairSet) -> dict[str, int]:
    """Pairs per source in a step, for plan, manifest and report."""
    return dict(Counter(r["source"] for r in ps.rows))


def stratified(natural: list[PairSet], fractions: list[float], seed: int) -> list[PairSet]:
    by_source: dict[str, list[dict]] = defaultdict(list)
    for ps in natural:
        for r in ps.rows:
            by_source[r["source"]].append(r)
    parts: list[list[dict]] = [[] for _ in fractions]
    rng = random.Random(seed)
    for source in sorted(by_source):
        rows = list(by_source[source])
        rng.shuffle(rows)
        start = 0
        for t, n in enumerate(step_sizes(len(rows), fractions)):
            parts[t] += rows[start : start + n]
            start += n
    reports = [rep for ps in natural for rep in ps.reports]
    return [dataclasses.replace(natural[0], rows=p, reports=reports) for p in parts]


def curriculum(natural: list[PairSet], fractions: list[float], score: Callable[[list[dict]], list[float]]) -> list[PairSet]:
    rows = [r for ps in natural for r in ps.rows]
    gammas = score(rows)
    # stable sort: ties keep the natural order, so the split is reproducible
    order = sorted(range(len(rows)), key=lambda i: -gammas[i])
    ranked = [{**rows[i], "gamma_base": float(gammas[i])} for i in order]
    parts, start = [], 0
    for n in step_sizes(len(ranked), fractions):
        parts.append(ranked[start : start + n])
        start += n
    reports = [rep for ps in natural for rep in ps.reports]
    return [dataclasses.replace(natural[0], rows=p, reports=reports) for p in parts]


def natural_fractions(natural: list[PairSet]) -> list[float]:
    total = sum(len(ps.rows) for ps in natural)
    return [len(ps.rows) / total for ps in natural]


def apply_split(strategy: str, natural: list[PairSet], fractions: list[float] | None, seed: int, score=None) -> list[PairSet]:
    if strategy == "natural":
        return natural
    fractions = fractions or natural_fractions(natural)
    if strategy == "stratified":
        return stratified(natural, fractions, seed)
    if strategy == "curriculum":
        if score is None:
            raise ValueError("the curriculum split needs the base model's gamma on every pair")
        return curriculum(natural, fractions, score)
    raise ValueError(f"unknown split strategy {strategy!r}")
