"""What the data path hands on: the pairs of a step (PairSet) and, per source, what happened to its rows
(SourceReport). Its own module so that lora_sdpo/splits.py, which regroups PairSets for lora_sdpo/data.py,
needs nothing from the module that calls it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from .contract import KeyReport


@dataclass
class SourceReport:
    label: str
    total: int = 0
    used: int = 0
    formats: Counter = field(default_factory=Counter)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based row, reason)
    duplicates: list[int] = field(default_factory=list)
    ties: list[int] = field(default_factory=list)  # rows whose answers pairs_from could not order
    inside: list[int] = field(default_factory=list)  # rows whose common-prefix split falls inside a word or line
    keys: KeyReport = field(default_factory=KeyReport)  # the row contract: keys used, not used, ignored
    score_ties: dict[str, list[int]] = field(default_factory=dict)  # "score_chosen == score_rejected" -> rows kept
    notes: dict[str, list[int]] = field(default_factory=dict)  # what pairs_from dropped or chose -> rows

    def summary(self) -> str:
        parts = [f"{self.label}: {self.used} pairs used of {self.total} rows"]
        if self.bad:
            parts.append(f"{len(self.bad)} bad dropped ({bad_rows_text(self.bad)})")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} exact duplicates dropped (rows {_list_text(self.duplicates)})")
        if self.ties:
            parts.append(f"{len(self.ties)} ties dropped (rows {_list_text(self.ties)})")
        for what, rows in self.score_ties.items():
            parts.append(f"{len(rows)} pairs kept whose {what} (rows {_list_text(rows)}; scores are not read)")
        for what, rows in self.notes.items():
            parts.append(f"{len(rows)} rows: {what} (rows {_list_text(rows)})")
        if self.inside:
            parts.append(f"warning: in {len(self.inside)} pairs the prompt/answer split falls inside a word or line "
                         f"(rows {_list_text(self.inside)}): the shared start of both answers went into the prompt; "
                         "give the prompt its own column (`prompt`, or `columns = {prompt = ...}`)")
        return "; ".join(parts)

    @property
    def notable(self) -> bool:
        """Something was dropped or looks wrong: worth a line in the run's log."""
        return bool(self.bad or self.duplicates or self.ties or self.inside)


def _list_text(rows: list[int], n: int = 8) -> str:
    head = ", ".join(str(r) for r in rows[:n])
    return head + (f", ... {len(rows) - n} more" if len(rows) > n else "")


def bad_rows_text(bad: list[tuple[int, str]], n: int = 5) -> str:
    """Bad rows grouped by reason, the most common first: "5 rows: chosen == rejected (rows 87, 517, ...)"."""
    groups: dict[str, list[int]] = {}
    for r, why in bad:
        groups.setdefault(why, []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))  # stable: first seen first among equals
    parts = [f"row {rows[0]}: {why}" if len(rows) == 1 else f"{len(rows)} rows: {why} (rows {_list_text(rows)})"
             for why, rows in ordered[:n]]
    rest = sum(len(rows) for _, rows in ordered[n:])
    return "; ".join(parts) + (f"; ... {rest} more rows for {len(ordered) - n} other reasons" if rest else "")


@dataclass
class PairSet:
    """The normalised pairs of one step (or of the eval data) and what was dropped on the way."""

    rows: list[dict]  # pair + {"source": label, "row": 1-based row number}
    reports: list[SourceReport]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.rows:
            h.update(json.dumps(r, sort_keys=True).encode())
        return h.hexdigest()
