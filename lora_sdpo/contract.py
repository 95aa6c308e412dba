"""The row contract: nothing in a row is lost without a word.

Every key of a source's rows is read by the format recognised (lora_sdpo/formats.py READS) or by the
`pairs_from` layout (lora_sdpo/derive.py), mapped by the source's `columns`, known metadata of that
layout, or listed in its `ignore`. Any other key is "not used": when it looks like content the run stops
before any model loads, naming the key, a sample and the two fixes; otherwise (labels, numbers,
booleans, copies of what is read) it is listed in the data report.

What looks like content (docs/data-formats.md, "Keys that are not used"):
- messages: a message (a speaker key: role, from, speaker, author, and a text key: content, value, text,
  message) or a list of them;
- free text: strings of four words or more in at least half of the key's non-empty values, and varied
  (at least half of those differ; one row is varied), or lists holding such strings;
- a copy is not lost: a value whose every string occurs in what the row's read keys hold (UltraFeedback
  binarized's `messages`, the chosen transcript again) is listed as a copy.
Short labels (model names, sources, ids, dates), numbers, booleans and other objects are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .derive import ANSWER_KEYS
from .errors import DataError
from .formats import READS

# Keys read by each pairs_from layout (its own names, as lora_sdpo/derive.py reads them; the score key is added).
PARTS = {"input", "system", "history", "tools"}  # derive._prompt: the parts a derived pair's prompt is made of
RULE_READS = {
    "ultrafeedback": {"instruction", "completions", *PARTS},
    "completions": {"prompt", "completions", "scores", "ranks", *PARTS},
    "oasst-tree": {"prompt", "text", "role", "replies"},
    "oasst-messages": {"message_id", "parent_id", "role", "text", "deleted"},
    "alpaca-eval": {"instruction", "output_1", "output_2", "preference", *PARTS},
    "arena": {"prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie", "winner", *PARTS},
    "arena-conversations": {"conversation_a", "conversation_b", "winner"},
    "response_a/response_b": {"prompt", "response_a", "response_b", "preference", *PARTS},
}
# Keys a layout carries that are content but not part of a pair: known, listed, never refused.
KNOWN_METADATA = {
    "alpaca-eval": {"raw_completion": "the judge's reasoning"},
    "ultrafeedback": {"correct_answers": "TruthfulQA's reference answers", "incorrect_answers": "TruthfulQA's reference answers"},
}
PROSE_WORDS = 4  # a string of this many words or more is prose, not a label
SAMPLE = 2000  # values of a key looked at (the first rows): enough to tell text from labels


@dataclass
class KeyReport:
    used: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)  # key -> what it holds (label, number, copy, ...)
    ignored: list[str] = field(default_factory=list)


def reads_of(fmt: str, src, raw: list) -> set[str]:
    """The key names (after `columns`) that the format or layout `fmt` ("orca", "arena (judgment)") reads."""
    if src.pairs_from:
        layout = fmt.rsplit(" (", 1)[0]
        reads = set(RULE_READS.get(layout, ())) - {"ranks" if src.pairs_from == "scores" else "scores"}
        reads.add(src.score_key or ("overall_score" if layout == "ultrafeedback" else "rank" if src.pairs_from == "ranking" else "score"))
        first = raw[0] if raw and isinstance(raw[0], dict) else {}
        if src.pairs_from == "scores" and "completions" not in first:  # one answer a row (derive.group_answers)
            reads |= {"prompt", *PARTS, next((k for k in ANSWER_KEYS if k in first), "response")}
        return reads
    return set(READS.get(fmt, ()))


SPEAKER, SAID = {"role", "from", "speaker", "author"}, {"content", "value", "text", "message"}


def _is_message(v: Any) -> bool:
    """A message: a speaker key (role, from, ...) and a text key (content, value, ...)."""
    return isinstance(v, dict) and bool(SPEAKER & set(v)) and bool(SAID & set(v))


def _strings(v: Any, depth: int = 0) -> list[str]:
    if isinstance(v, str):
        return [v]
    if depth < 3 and isinstance(v, (list, tuple)):
        return [s for x in v for s in _strings(x, depth + 1)]
    if depth < 3 and _is_message(v):
        return [s for x in v.values() for s in _strings(x, depth + 1)]
    return []


def _kind(values: list[Any]) -> str:
    """What a key holds over the rows: messages, text, label, number, boolean, list, object, empty."""
    present = [v for v in values if v is not None and v != "" and v != [] and v != {}]
    if not present:
        return "empty"
    if any(_is_message(v) or (isinstance(v, list) and any(_is_message(x) for x in v)) for v in present):
        return "messages"
    strings = [s for v in present if isinstance(v, (str, list, tuple)) for s in _strings(v) if s.strip()]
    prose = [s for s in strings if len(s.split()) >= PROSE_WORDS]
    if prose and 2 * len(prose) >= len(strings) and (len(prose) == 1 or 2 * len(set(prose)) >= len(prose)):
        return "text"
    if all(isinstance(v, bool) for v in present):
        return "boolean"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "number"
    if all(isinstance(v, str) for v in present):
        return "label"
    return "list" if all(isinstance(v, (list, tuple)) for v in present) else "object"


def _is_copy(v: Any, row: dict, read: set[str]) -> bool:
    """Every string of `v` occurs in what the row's read keys hold."""
    strings = [s for s in _strings(v) if s.strip()]
    if not strings:
        return True
    held = "\n".join(s for k in read if k in row for s in _strings(row[k]))
    return all(s in held for s in strings)


def check(src, raw: list, fmt: str) -> KeyReport:
    """The keys of `raw` sorted into used, not used (with what they hold) and ignored; DataError for a key
    that looks like content and is not used, and for a `columns` entry the format does not read."""
    reads = reads_of(fmt, src, raw)
    fields = {k: v for k, v in (src.columns or {}).items() if k not in ("role", "content")}
    unread = [f"columns.{k} = {v!r}" for k, v in fields.items() if k not in reads]
    if unread:
        raise DataError(f"{src.label}: {', '.join(unread)}: the {fmt} format does not read "
                        f"{', '.join(k for k in fields if k not in reads)}; it reads {', '.join(sorted(reads))}")
    used_original = {v for k, v in fields.items() if k in reads}
    used_original |= {k for k in reads if k not in fields}
    rows = [r for r in raw if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    ignore = set(src.ignore or ())
    rep = KeyReport(used=[k for k in keys if k in used_original and k not in ignore], ignored=[k for k in keys if k in ignore])
    layout = fmt.rsplit(" (", 1)[0]
    problems = []
    for k in keys:
        if k in used_original or k in ignore:  # ignored keys never reach a format (data._normalised drops them)
            continue
        if k in KNOWN_METADATA.get(layout, {}):
            rep.unused[k] = f"metadata: {KNOWN_METADATA[layout][k]}"
            continue
        having = [(n, r[k]) for n, r in enumerate(raw, 1) if isinstance(r, dict) and k in r][:SAMPLE]
        kind = _kind([v for _, v in having])
        if kind in ("messages", "text"):
            lost = next(((n, v) for n, v in having if not _is_copy(v, raw[n - 1], used_original)), None)
            if lost is None:
                rep.unused[k] = f"a copy of what is read ({kind})"
                continue
            n, v = lost
            sample = repr(v)
            sample = sample if len(sample) <= 80 else sample[:77] + "..."
            problems.append(f"`{k}` ({'a message list' if kind == 'messages' else 'free text'}; row {n}: {sample})")
            continue
        rep.unused[k] = kind
    if problems:
        names = [p.split("`")[1] for p in problems]
        if fmt in ("hh", "implicit") and "prompt" not in fields:
            part = "prompt"
        elif "message list" in problems[0]:
            part = "history" if "history" in reads else "prompt"
        else:
            part = next((x for x in ("input", "system") if x in reads), "prompt")
        raise DataError(
            f"{src.label}: {'a key' if len(problems) == 1 else f'{len(problems)} keys'} that look{'s' if len(problems) == 1 else ''} "
            f"like content but {'is' if len(problems) == 1 else 'are'} not read by the {fmt} format: {'; '.join(problems)}. "
            f"Either map {'it' if len(problems) == 1 else 'each'} to a part of the prompt with `columns` (system, input, "
            f"history, tools; e.g. columns = {{ {part} = \"{names[0]}\" }}) "
            f"or, if the model should not see it, list it in ignore = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in names)}]"
            " (lora-sdpo data: --columns, --ignore)")
    return rep
