"""Preference data: read a source, recognise its format, normalise every row to one pair shape.

The pair shape is TRL's conversational preference format:
    {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message]}
so the tokenizer's chat template is applied by TRL exactly as in a plain DPOTrainer run. Rows
whose transcripts carry no roles (Anthropic HH's "\\n\\nHuman: ... \\n\\nAssistant: ...") stay as
TRL's standard string format. Bad rows are reported with their row numbers, never silently dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import audit
from .errors import DataError
from .recipe import LoadedRecipe, SourceConfig
from .rundir import atomic_write_bytes_if_changed
from .splits import apply_split


@dataclass
class SourceReport:
    label: str
    total: int = 0
    used: int = 0
    formats: Counter = field(default_factory=Counter)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based row, reason)
    duplicates: list[int] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.label}: {self.used} pairs used of {self.total} rows"]
        if self.bad:
            parts.append(f"{len(self.bad)} bad dropped ({bad_rows_text(self.bad)})")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} exact duplicates dropped (rows {_list_text(self.duplicates)})")
        return "; ".join(parts)


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


# ----------------------------------------------------------------------------- reading


def read_source(src: SourceConfig, recipe: LoadedRecipe | None = None) -> list[dict]:
    """All rows of a source as dicts, in file order."""
    if src.dataset is not None:
        return _read_hub(src)
    path = recipe.resolve(src.path) if recipe else Path(src.path)
    return read_file(path)


COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
READABLE = ".jsonl, .json, .parquet or .csv (the text ones also compressed as .gz, .bz2 or .xz)"


def _kind(path: Path) -> tuple[str, str | None]:
    """(file type, compression) from the name: data.jsonl.gz -> (".jsonl", "gzip")."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSION[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


def _open_text(path: Path, compression: str | None, newline: str | None = None):
    # utf-8-sig: a byte-order mark (Windows tools write one) is skipped, not read as part of row 1
    if compression is None:
        return path.open(encoding="utf-8-sig", newline=newline)
    import importlib

    return importlib.import_module(compression).open(path, "rt", encoding="utf-8-sig", newline=newline)


def read_file(path: Path) -> list[dict]:
    suffix, compression = _kind(path)
    try:
        if suffix == ".jsonl":
            with _open_text(path, compression) as f:
                return _json_lines(f, path)
        if suffix == ".json":
            with _open_text(path, compression) as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg == "Extra data":  # JSON lines in a .json file, as many Hub datasets ship them
                    return _json_lines(io.StringIO(text), path)
                raise DataError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
            return json_rows(data, path)
        if suffix == ".parquet" and compression is None:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with _open_text(path, compression, newline="") as f:
                return list(csv.DictReader(f))
    except OSError as e:  # also a damaged or mislabelled compressed file (gzip.BadGzipFile, lzma.LZMAError)
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except EOFError:
        raise DataError(f"{path}: the compressed file ends early (truncated download?); fetch it again") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    name = "".join(path.suffixes[-2:]) if compression else path.suffix
    raise DataError(f"{path}: unsupported file type {name!r}; use {READABLE}")


def _json_lines(f, path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def json_rows(data: Any, path: Path) -> list:
    """The rows of a parsed JSON document, in every layout pandas' DataFrame.to_json writes.

    records: [{...}, ...]; columns (pandas' default): {"chosen": {"0": ..., "1": ...}, ...};
    column lists: {"chosen": [...], "rejected": [...]}; index: {"0": {...}, "1": {...}};
    split: {"columns": [...], "data": [[...], ...]}; table and {"data": [...]}: the rows under "data".
    """
    if isinstance(data, list):
        return data
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a JSON list of rows, an object of columns or JSON lines (in a .jsonl file)")
    if isinstance(data.get("columns"), list) and isinstance(data.get("data"), list) and all(isinstance(r, list) for r in data["data"]):
        return [dict(zip(data["columns"], r)) for r in data["data"]]
    if isinstance(data.get("data"), list):
        return data["data"]
    values = list(data.values())
    if all(isinstance(v, list) for v in values):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{path}: its columns have different lengths ({', '.join(f'{k}: {n}' for k, n in lengths.items())}); "
                            "every column needs one value per row")
        return [dict(zip(data, r)) for r in zip(*values)]
    if all(isinstance(v, dict) for v in values):
        if all(str(k).isdigit() for k in data):  # index layout: row number -> row
            return [data[k] for k in sorted(data, key=int)]
        index = list(dict.fromkeys(i for v in values for i in v))
        return [{col: data[col].get(i) for col in data} for i in index]
    raise DataError(f"{path}: expected a JSON list of rows, an object of columns ({{\"chosen\": [...], "
                    "\"rejected\": [...]}}) or JSON lines (in a .jsonl file)")


def _read_hub(src: SourceConfig) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(src.dataset, split=src.split, revision=src.revision)
    except Exception as e:  # the Hub client raises many types; all mean "not reachable here"
        raise DataError(
            f"dataset {src.dataset!r} (split {src.split!r}) is not reachable: {type(e).__name__}: {e}. "
            "Without network access (HF_HUB_OFFLINE=1), download it first or point `path` at a local file."
        ) from None
    return ds.to_list()


# ----------------------------------------------------------------------------- normalising


def _msg(role: str, content: Any) -> dict:
    return {"role": role, "content": content}


def _check_messages(msgs: Any, what: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"{what} is not a non-empty list of messages"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{what}[{i}] has no role/content"
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            return f"{what}[{i}] role/content is not a string"
    return None


def _sharegpt(msgs: Any) -> list[dict]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    if isinstance(msgs, dict):
        msgs = [msgs]
    return [_msg(roles.get(m.get("from"), m.get("from")), m.get("value")) for m in msgs]


def _parts(msgs: Any, what: str) -> Any:
    """Messages whose content is a list of parts ({"type": "text", "text"|"value": ...}, the shape of
    transformers chat templates, the OpenAI API and LLaMA-Factory) as plain-string messages: the text
    parts joined without a separator, as those chat templates render them. Anything else is
    returned as it came, so the formats that were read before are normalised exactly as before."""
    if not isinstance(msgs, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs):
        return msgs
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        texts = []
        for j, part in enumerate(m["content"]):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if kind != "text" or not isinstance(text, str):
                raise _Bad(f"{what}[{i}].content[{j}] is a part of type {kind!r}; only text parts can be trained on")
            texts.append(text)
        out.append({"role": m.get("role"), "content": "".join(texts)})
    return out


FORMAT_KEYS = {
    "messages": ("chosen_messages", "rejected_messages"),
    "openai": ("input", "preferred_output", "non_preferred_output"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "orca": ("question", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "standard": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}


ACCEPTED = (
    "TRL standard or conversational (prompt, chosen, rejected), implicit prompt (chosen, rejected: full transcripts), "
    "OpenAI (input, preferred_output, non_preferred_output), Orca (system, question, chosen, rejected), ShareGPT "
    "(conversations, chosen, rejected), message lists (chosen_messages, rejected_messages, optional prompt_messages); "
    "message content may be a string or a list of text parts"
)


def detect_format(row: dict) -> str:
    keys = set(row)
    if {"chosen_messages", "rejected_messages"} <= keys:
        return "messages"
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"question", "chosen", "rejected"} <= keys:
        return "orca"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "conversational" if isinstance(row["chosen"], list) else "standard"
    if {"chosen", "rejected"} <= keys:
        return "implicit"
    return "unknown"


def normalise(row: Any) -> tuple[str, dict | None, str | None]:
    """(format, pair, None) for a good row, (format, None, reason) for a bad one."""
    if not isinstance(row, dict):
        return "unknown", None, "row is not an object"
    fmt = detect_format(row)
    try:
        pair = _to_pair(fmt, row)
    except _Bad as e:
        return fmt, None, str(e)
    return fmt, pair, _check_pair(pair)


class _Bad(Exception):
    pass


def _need_str(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise _Bad(f"`{key}` is {'missing' if v is None else type(v).__name__}, not a string")
    return v


def _to_pair(fmt: str, row: dict) -> dict:
    from trl.data_utils import extract_prompt

    if fmt == "messages":  # LLaMA-Factory's chosen_messages / rejected_messages (full transcripts)
        chosen, rejected = _parts(row["chosen_messages"], "chosen_messages"), _parts(row["rejected_messages"], "rejected_messages")
        if row.get("prompt_messages") is not None:
            return {"prompt": _parts(row["prompt_messages"], "prompt_messages"), "chosen": chosen, "rejected": rejected}
        return _to_pair("implicit", {"chosen": chosen, "rejected": rejected})
    if fmt == "openai":
        inp = row["input"]
        prompt = inp.get("messages") if isinstance(inp, dict) else None
        return {"prompt": _parts(prompt, "input.messages"), "chosen": _parts(row["preferred_output"], "preferred_output"),
                "rejected": _parts(row["non_preferred_output"], "non_preferred_output")}
    if fmt == "orca":
        prompt = [_msg("user", _need_str(row, "question"))]
        if row.get("system"):
            prompt.insert(0, _msg("system", _need_str(row, "system")))
        return {
            "prompt": prompt,
            "chosen": [_msg("assistant", _need_str(row, "chosen"))],
            "rejected": [_msg("assistant", _need_str(row, "rejected"))],
        }
    if fmt == "sharegpt":
        return {"prompt": _sharegpt(row["conversations"]), "chosen": _sharegpt(row["chosen"]), "rejected": _sharegpt(row["rejected"])}
    if fmt == "standard":
        return {
            "prompt": [_msg("user", _need_str(row, "prompt"))],
            "chosen": [_msg("assistant", _need_str(row, "chosen"))],
            "rejected": [_msg("assistant", _need_str(row, "rejected"))],
        }
    if fmt == "conversational":
        chosen, rejected = _parts(row["chosen"], "chosen"), _parts(row["rejected"], "rejected")
        if not isinstance(rejected, list):
            raise _Bad("`chosen` is a message list but `rejected` is not")
        prompt = _parts(row["prompt"], "prompt")
        # UltraFeedback binarized: a prompt string and full transcripts that repeat it.
        if isinstance(prompt, str):
            ex = extract_prompt({"chosen": chosen, "rejected": rejected})
            if not ex["prompt"]:
                raise _Bad("chosen and rejected transcripts share no prompt messages")
            return ex
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "implicit":
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, str) and isinstance(rejected, str):
            if chosen != rejected and (chosen.startswith(rejected) or rejected.startswith(chosen)):
                raise _Bad("one completion is a prefix of the other, so there is no point where the prompt ends")
            ex = extract_prompt({"chosen": chosen, "rejected": rejected})
            if not ex["prompt"].strip():
                raise _Bad("chosen and rejected share no common prompt prefix")
            return ex
        if isinstance(chosen, list) and isinstance(rejected, list):
            chosen, rejected = _parts(chosen, "chosen"), _parts(rejected, "rejected")
            short, long_ = sorted((chosen, rejected), key=len)
            if chosen != rejected and long_[: len(short)] == short:
                raise _Bad("one transcript is a prefix of the other, so there is no point where the prompt ends")
            ex = extract_prompt({"chosen": chosen, "rejected": rejected})
            if not ex["prompt"]:
                raise _Bad("chosen and rejected transcripts share no prompt messages")
            return ex
        raise _Bad("`chosen` and `rejected` must both be strings or both message lists")
    raise _Bad("unrecognised format")


def _check_pair(pair: dict) -> str | None:
    if isinstance(pair["chosen"], str):  # standard strings (implicit prompt without roles)
        for k in ("chosen", "rejected"):
            if not isinstance(pair[k], str) or not pair[k].strip():
                return f"{k} completion is empty"
        return "chosen == rejected" if pair["chosen"] == pair["rejected"] else None
    for k in ("prompt", "chosen", "rejected"):
        problem = _check_messages(pair[k], k)
        if problem:
            return problem
    for k in ("chosen", "rejected"):
        if not any(m["content"].strip() for m in pair[k]):
            return f"{k} completion is empty"
    if pair["chosen"] == pair["rejected"]:
        return "chosen == rejected"
    return None


# ----------------------------------------------------------------------------- steps


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


def load_pairs(sources: list[SourceConfig], recipe: LoadedRecipe, max_bad_fraction: float) -> PairSet:
    rows, reports = [], []
    for src in sources:
        raw = read_source(src, recipe)
        rep = SourceReport(label=src.label, total=len(raw))
        seen: set[str] = set()
        valid = 0
        results = [normalise(r) for r in raw]
        rep.formats.update(fmt for fmt, _, _ in results if fmt != "unknown")
        if raw and not rep.formats:
            raise DataError(f"{src.label}: unrecognised format: {_first_keys(raw)}. lora-sdpo reads: {ACCEPTED}")
        main_fmt = rep.formats.most_common(1)[0][0] if rep.formats else None
        for n, (r, (fmt, pair, problem)) in enumerate(zip(raw, results), 1):
            if problem:
                if fmt == "unknown" and main_fmt and isinstance(r, dict):
                    missing = [k for k in FORMAT_KEYS[main_fmt] if k not in r]
                    problem = f"missing {', '.join(f'`{k}`' for k in missing)} (the other rows are {main_fmt} format)"
                rep.bad.append((n, problem))
                continue
            key = json.dumps(pair, sort_keys=True)
            if key in seen:
                rep.duplicates.append(n)
                continue
            seen.add(key)
            valid += 1
            if valid > src.offset and (src.limit is None or rep.used < src.limit):
                rows.append({**pair, "source": src.label, "row": n})
                rep.used += 1
        if rep.total == 0:
            raise DataError(f"{src.label}: has no rows")
        if len(rep.formats) > 1:
            fmts = ", ".join(f"{k} ({v} rows)" for k, v in rep.formats.most_common())
            raise DataError(f"{src.label}: mixes formats ({fmts}); split it into one file per format")
        if len(rep.bad) > max_bad_fraction * rep.total:
            raise DataError(
                f"{src.label}: {len(rep.bad)} of {rep.total} rows are bad, more than data.max_bad_fraction = "
                f"{max_bad_fraction}: {bad_rows_text(rep.bad)}. Fix the rows or raise data.max_bad_fraction."
            )
        if rep.used == 0:
            raise DataError(f"{src.label}: no usable pairs ({bad_rows_text(rep.bad)})")
        reports.append(rep)
    return PairSet(rows=rows, reports=reports)


def _first_keys(raw: list) -> str:
    first = raw[0]
    if not isinstance(first, dict):
        return f"row 1 is a JSON {type(first).__name__}, not an object of fields"
    return f"row 1 has the keys {', '.join(map(str, first)) or '(none)'}"


def load_step_pairs(recipe: LoadedRecipe, index: int) -> PairSet:
    """D_t for step `index` (0-based) under the recipe's split strategy."""
    return load_pairs(recipe.recipe.steps[index].sources, recipe, recipe.recipe.data.max_bad_fraction)


def load_eval_pairs(recipe: LoadedRecipe) -> PairSet | None:
    if not recipe.recipe.data.eval:
        return None
    return load_pairs(recipe.recipe.data.eval, recipe, recipe.recipe.data.max_bad_fraction)


def drop_overlong(pairs: PairSet, tokenizer, max_length: int, max_bad_fraction: float) -> tuple[PairSet, list[int]]:
    """Pairs whose prompt fills max_length would give TRL nothing to train on (it drops them silently).

    Report them by source and row; refuse like any other bad row above data.max_bad_fraction.
    """
    lengths = token_lengths(pairs.rows, tokenizer)
    keep, bad = [], []
    for r, (p, _, _) in zip(pairs.rows, lengths):
        if p >= max_length:
            bad.append((r, p))
        else:
            keep.append(r)
    if bad:
        where = "; ".join(f"{r['source']} row {r['row']} ({p} prompt tokens)" for r, p in bad[:5])
        if len(bad) > max_bad_fraction * len(pairs.rows):
            raise DataError(
                f"{len(bad)} of {len(pairs.rows)} pairs have prompts of max_length ({max_length}) tokens or more, "
                f"leaving no room for the completion: {where}. Raise training.max_length or shorten the prompts."
            )
    return PairSet(rows=keep, reports=pairs.reports), [(r["source"], r["row"]) for r, _ in bad]


@dataclass
class RunData:
    """Every step's D_t and the eval data, validated before any training starts."""

    steps: list[PairSet]
    overlong: list[str]  # "source row N" of pairs dropped because the prompt fills max_length
    eval: PairSet | None
    audit: Any = None  # audit.Audit: what the steps and the held-out set share


def prepare_run_data(recipe: LoadedRecipe, tokenizer, score=None) -> RunData:
    """Read and check all data up front: a bad row in step 2's file must not wait for step 1's hours.

    `score(rows) -> gammas` (the base model's) is needed only by the curriculum split.
    """
    t = recipe.recipe.training
    frac = recipe.recipe.data.max_bad_fraction
    steps, overlong = [], []
    for i in range(len(recipe.recipe.steps)):
        ps, dropped = drop_overlong(load_step_pairs(recipe, i), tokenizer, t.max_length, frac)
        if not ps.rows:
            raise DataError(f"step {i + 1}: no pairs left after dropping bad rows; check its sources")
        steps.append(ps)
        overlong += [f"{s} row {n}" for s, n in dropped]
    d = recipe.recipe.data
    steps = apply_split(d.split, steps, d.fractions, recipe.recipe.run.seed, score)
    ev = load_eval_pairs(recipe)
    if ev is not None:
        ev, _ = drop_overlong(ev, tokenizer, t.max_length, frac)
    found = audit([ps.rows for ps in steps], ev.rows if ev else None, d.allow_eval_overlap)
    found.check()  # a held-out set that overlaps the steps is refused here, before anything is written
    return RunData(steps=steps, overlong=overlong, eval=ev, audit=found)


def write_pairs(pairs: PairSet, path: Path) -> None:
    """pairs.jsonl of a step, left untouched when a resumed step finds it already right (TRL's
    dataset cache, which holds the tokenised pairs and the reference log-probs, is keyed on it)."""
    atomic_write_bytes_if_changed(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs.rows).encode())


def tokenize_pair(row: dict, tokenizer) -> dict:
    """prompt_ids / chosen_ids / rejected_ids exactly as TRL's DPOTrainer tokenises a pair."""
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(row["chosen"], list):
        prompt = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
        chosen = _tokenize(tokenizer, row["prompt"] + row["chosen"])["input_ids"]
        rejected = _tokenize(tokenizer, row["prompt"] + row["rejected"])["input_ids"]
    else:  # standard strings: TRL appends EOS to the completions
        eos = tokenizer.eos_token
        c = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
        r = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
        prompt = _tokenize(tokenizer, row["prompt"])["input_ids"]
        chosen = _tokenize(tokenizer, row["prompt"] + c)["input_ids"]
        rejected = _tokenize(tokenizer, row["prompt"] + r)["input_ids"]
    n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}


def token_lengths(rows: list[dict], tokenizer) -> list[tuple[int, int, int]]:
    """(prompt, prompt+chosen, prompt+rejected) token counts, as TRL tokenises them."""
    out = []
    for r in rows:
        t = tokenize_pair(r, tokenizer)
        p = len(t["prompt_ids"])
        out.append((p, p + len(t["chosen_ids"]), p + len(t["rejected_ids"])))
    return out
