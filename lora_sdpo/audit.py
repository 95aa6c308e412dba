"""What each reference has seen: overlaps of normalised pairs across steps and the held-out set.

sDPO's argument rests on it (Kim et al. 2024, sec. 4.2): a reference that trained on the pairs of
D_t sets a bound on them the policy can hardly beat (the paper's M_2, mean gamma 84.35 on its own
training data), and a held-out set that shares pairs with a step measures training, not held-out,
behaviour. The audit compares every two steps, and every step with the held-out set, by hashing:
each pair and each prompt becomes one digest (blake2b) of a canonical text form, so 60k x 60k rows is a set
intersection, not 3.6e9 comparisons.

"Normalised" means: whatever format a row came in (Orca, TRL standard or conversational, OpenAI,
ShareGPT, content parts), the same prompt messages and completions after role names are mapped to
user/assistant/system, whitespace runs collapse to one space, and empty system messages are
dropped. Two pairs are the same pair when prompt, chosen and rejected all match; they share a
prompt when only the prompt matches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .errors import DataError
from .manifest import Manifest
from .roles import ROLES
SHOW = 5  # rows named in a message; the manifest keeps up to KEEP
KEEP = 50


def _canonical(part, roles=ROLES) -> str:
    """A prompt or completion in canonical form, as one string: role NUL text per message, messages split by
    SOH (neither occurs in text people write); a bare string (a transcript without roles) is one message."""
    if isinstance(part, str):
        return "text\0" + " ".join(part.split())
    # one comprehension, not a loop of calls: this runs for every pair of every step (60k rows in seconds)
    msgs = [roles.get(r, r) + "\0" + " ".join((m.get("content") or "").split())
            for m in part for r in (str(m.get("role", "")).strip().lower(),)]
    return "\1".join(x for x in msgs if x != "system\0")


def pair_keys(pair: dict) -> tuple[bytes, bytes]:
    """(pair digest, prompt digest) of a normalised pair; independent of the format it came in."""
    prompt = hashlib.blake2b(_canonical(pair["prompt"]).encode(), digest_size=16).digest()
    whole = "\2".join((_canonical(pair["chosen"]), _canonical(pair["rejected"])))
    return hashlib.blake2b(prompt + whole.encode(), digest_size=16).digest(), prompt


@dataclass
class Overlap:
    """Rows of `b` that also occur in `a`: the same pair, or the same prompt with other completions."""

    a: str
    b: str
    exact: list[tuple[str, str]] = field(default_factory=list)  # ("source row N" of b, "source row M" of a)
    prompt: list[tuple[str, str]] = field(default_factory=list)

    def text(self) -> str:
        parts = []
        if self.exact:
            parts.append(f"{_pairs(len(self.exact))} of {self.b} also in {self.a} ({_where(self.exact)})")
        if self.prompt:
            parts.append(f"{_pairs(len(self.prompt))} of {self.b} with the prompt of a pair of {self.a} but other "
                         f"completions ({_where(self.prompt)})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "exact": len(self.exact), "prompt": len(self.prompt),
                "exact_rows": [list(x) for x in self.exact[:KEEP]], "prompt_rows": [list(x) for x in self.prompt[:KEEP]]}


def _pairs(n: int) -> str:
    return f"{n} pair" + ("" if n == 1 else "s")


def _where(rows: list[tuple[str, str]]) -> str:
    head = ", ".join(f"{b} = {a}" for b, a in rows[:SHOW])
    return head + (f", ... {len(rows) - SHOW} more" if len(rows) > SHOW else "")


def _label(row: dict) -> str:
    return f"{row['source']} row {row['row']}"


def _index(rows: list[dict]) -> tuple[dict, dict, list]:
    pairs, prompts, keys = {}, {}, []
    for r in rows:
        k = pair_keys(r)
        keys.append(k)
        pairs.setdefault(k[0], r)
        prompts.setdefault(k[1], r)
    return pairs, prompts, keys


def overlaps(named: dict[str, list[dict]]) -> list[Overlap]:
    """Every two datasets in order (D_1, D_2, ..., eval): the rows of the later one found in the earlier one."""
    names = list(named)
    index = {n: _index(named[n]) for n in names}
    found = []
    for j, b in enumerate(names):
        for a in names[:j]:
            pairs_a, prompts_a, _ = index[a]
            ov = Overlap(a=a, b=b)
            for row, (pk, qk) in zip(named[b], index[b][2]):
                if pk in pairs_a:
                    ov.exact.append((_label(row), _label(pairs_a[pk])))
                elif qk in prompts_a:
                    ov.prompt.append((_label(row), _label(prompts_a[qk])))
            if ov.exact or ov.prompt:
                found.append(ov)
    return found


@dataclass
class Audit:
    overlaps: list[Overlap]
    eval_allowed: bool

    @property
    def between_steps(self) -> list[Overlap]:
        return [o for o in self.overlaps if o.b != "eval"]

    @property
    def with_eval(self) -> list[Overlap]:
        return [o for o in self.overlaps if o.b == "eval"]

    def warnings(self) -> list[str]:
        """Overlaps between steps: allowed (some repeat data on purpose), but each later reference has seen them."""
        out = [f"data overlap: {o.text()}. Step {o.b[2:]}'s reference M_{int(o.b[2:]) - 1} has trained on them "
               "(Kim et al. 2024, sec. 4.2: a reference that saw the data sets a bound the policy can hardly beat); "
               "remove them from one step unless the repetition is intended" for o in self.between_steps]
        if self.eval_allowed and self.with_eval:
            out += [f"held-out overlap accepted (data.allow_eval_overlap = true): {o.text()}; every report marks the "
                    "eval column as contaminated" for o in self.with_eval]
        return out

    def check(self) -> None:
        """A held-out set that shares pairs or prompts with a step is refused, unless the recipe accepts it."""
        if self.with_eval and not self.eval_allowed:
            raise DataError(
                "the held-out data ([[data.eval]]) overlaps the training steps: "
                + "; ".join(o.text() for o in self.with_eval)
                + ". Held-out numbers on pairs a model trained on are meaningless: remove these rows from the eval "
                "source or from the steps (e.g. with `offset`/`limit`), or set data.allow_eval_overlap = true to accept "
                "it (every report then marks the eval column as contaminated)"
            )

    def to_dict(self) -> dict:
        return {
            "eval_contaminated": bool(self.with_eval),
            "eval_overlap_allowed": self.eval_allowed,
            "overlaps": [o.to_dict() for o in self.overlaps],
        }


def audit(steps: list[list[dict] | None], eval_rows: list[dict] | None, allow_eval_overlap: bool = False) -> Audit:
    """Steps given as None (not readable here, e.g. a Hub dataset offline) are left out of the comparison."""
    named = {f"D_{i + 1}": rows for i, rows in enumerate(steps) if rows is not None}
    if eval_rows:
        named["eval"] = eval_rows
    return Audit(overlaps=overlaps(named), eval_allowed=allow_eval_overlap)


def contamination_note(m: Manifest) -> str | None:
    """What reports say under the eval column of a run whose held-out data overlaps its steps."""
    ov = m.overlap
    if ov is None or not ov.eval_contaminated:
        return None
    parts = [f"{o.exact} pairs and {o.prompt} prompts also in {o.a}" for o in ov.overlaps if o.b == "eval"]
    return "eval is CONTAMINATED: " + "; ".join(parts) + " (accepted with data.allow_eval_overlap = true)"
