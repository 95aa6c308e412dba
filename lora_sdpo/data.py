"""Preference data of a step: every source read (lora_sdpo/readers.py), its rows normalised to one pair
shape (lora_sdpo/formats.py, or derived by a rule: lora_sdpo/derive.py), bad rows reported with their
row numbers, never silently dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audit import audit
from .contract import check as check_keys
from .derive import EXPECTED, RULES, as_number, assemble_trees, derive, group_answers, layout_of
from .errors import DataError
from .pairset import PairSet, SourceReport, bad_rows_text  # noqa: F401  (data.PairSet: where callers import it)
from .formats import ACCEPTED, FORMAT_KEYS, Bad, apply_columns, detect_format, normalise, split_inside, templated_problem  # noqa: F401
from .readers import BadRow, CellError, json_rows, read_file, read_source  # noqa: F401
from .recipe import LoadedRecipe, RunConfig, SourceConfig
from .roles import role_table
from .rundir import atomic_write_bytes_if_changed
from .splits import apply_split


def load_pairs(sources: list[SourceConfig], recipe: LoadedRecipe | None, max_bad_fraction: float) -> PairSet:
    rows, reports = [], []
    seed = recipe.recipe.run.seed if recipe is not None else RunConfig.model_fields["seed"].default
    for src in sources:
        raw = read_source(src, recipe)
        rep = SourceReport(label=src.label, total=len(raw))
        if rep.total == 0:
            raise DataError(f"{src.label}: has no rows")
        _check_columns(src, raw)
        results, notes = _normalised(raw, src, seed)
        rep.formats.update(fmt for _, fmt, _, _ in results if fmt not in ("unknown", "tie"))
        if not rep.formats:
            raise DataError(_unknown(src, raw, results))
        main_fmt = rep.formats.most_common(1)[0][0]
        rep.keys = check_keys(src, raw, main_fmt)
        for n, why in notes:
            rep.notes.setdefault(why, []).append(n)
        seen: set[str] = set()
        valid = 0
        for n, fmt, pair, problem in results:
            if fmt == "tie":
                rep.ties.append(n)
                continue
            if problem:
                if fmt == "unknown" and not src.pairs_from and isinstance(raw[n - 1], dict) and main_fmt in FORMAT_KEYS:
                    missing = [k for k in FORMAT_KEYS[main_fmt] if k not in raw[n - 1]]
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
                if fmt == "implicit" and split_inside(pair):
                    rep.inside.append(n)
                rows.append({**pair, "source": src.label, "row": n})
                if not src.pairs_from and (tie := _score_tie(raw[n - 1])):
                    rep.score_ties.setdefault(tie, []).append(n)
                rep.used += 1
        if len(rep.formats) > 1:
            fmts = ", ".join(f"{k} ({v} rows)" for k, v in rep.formats.most_common())
            raise DataError(f"{src.label}: mixes formats ({fmts}); split it into one file per format")
        if len(rep.bad) == rep.total and len({why for _, why in rep.bad}) == 1:
            raise DataError(f"{src.label}: no usable pairs: every row is bad for the same reason ({bad_rows_text(rep.bad)}); "
                            "raising data.max_bad_fraction cannot help")
        if len(rep.bad) > max_bad_fraction * rep.total:
            raise DataError(
                f"{src.label}: {len(rep.bad)} of {rep.total} rows are bad, more than data.max_bad_fraction = "
                f"{max_bad_fraction}: {bad_rows_text(rep.bad)}. Fix the rows or raise data.max_bad_fraction."
            )
        if rep.used == 0:
            why = bad_rows_text(rep.bad) if rep.bad else f"every row is a tie ({len(rep.ties)} rows)" if rep.ties else "none left"
            raise DataError(f"{src.label}: no usable pairs ({why})")
        reports.append(rep)
    return PairSet(rows=rows, reports=reports)


SCORE_KEYS = [("score_chosen", "score_rejected"), ("chosen-rating", "rejected-rating"), ("chosen_rating", "rejected_rating"),
              ("chosen_score", "rejected_score"), ("chosen-score", "rejected-score")]


def _score_tie(row: Any) -> str | None:
    """A pair whose own scores are equal ("score_chosen == score_rejected"), under the row or its `metadata`."""
    for d in (row, row.get("metadata")) if isinstance(row, dict) else ():
        if isinstance(d, dict):
            for a, b in SCORE_KEYS:
                x, y = as_number(d.get(a)), as_number(d.get(b))
                if x is not None and x == y:
                    return f"{a} equals {b}"
    return None


def _normalised(raw: list, src: SourceConfig, seed: int) -> tuple[list[tuple[int, str, dict | None, str | None]], list[tuple[int, str]]]:
    """(row number, format, pair, problem) for each pair of each row, format "tie" for a row pairs_from dropped;
    and (row number, note) for what pairs_from dropped or chose in a row."""

    roles = role_table(src.roles)
    out, notes = [], []
    if src.ignore:  # the source's `ignore`: keys that are not part of a pair, gone before any format reads the row
        raw = [{k: v for k, v in r.items() if k not in src.ignore} if isinstance(r, dict) else r for r in raw]
    rows = enumerate(raw, 1)
    trees = assemble_trees(raw) if src.pairs_from == "ranking" else None
    if trees is not None:  # one message a row: the trees are the rows, numbered by their root message
        rows, orphans = trees
        out += [(n, "?", None, why) for n, why in orphans]
    grouped = group_answers(raw, src.score_key or "score") if src.pairs_from == "scores" else None
    if grouped is not None:  # one answer a row: the answers of each prompt are one row, numbered by its first
        rows = grouped
    for n, r in rows:
        fmt = "?"
        if isinstance(r, BadRow):  # a line of a flat file that does not fit its header
            out.append((n, "?", None, str(r)))
            continue
        try:
            r = apply_columns(r, src.columns)
            if not src.pairs_from:
                fmt, pair, problem = normalise(r, roles, src.templated)
                if isinstance(r, dict) and any(isinstance(v, CellError) for v in r.values()):
                    fmt = "?"  # a cell that did not parse: the row's format is that of the rows around it
                out.append((n, fmt, pair, problem))
                continue
            fmt = f"{layout_of(r, src.pairs_from)} ({src.pairs_from})"
            got = derive(r, src.pairs_from, src, seed, n)
        except Bad as e:
            if str(e) == "unknown":  # no layout of the rule fits this row
                keys = ", ".join(map(str, list(r)[:10])) if isinstance(r, dict) else type(r).__name__
                out.append((n, "unknown", None, f"no layout of pairs_from = \"{src.pairs_from}\" fits (keys {keys})"))
            else:
                out.append((n, fmt, None, str(e)))
            continue
        notes += [(n, why) for why in dict.fromkeys(got.notes)]
        if got.tie:
            out.append((n, "tie", None, None))
        for d in got.rows:
            _, pair, problem = normalise(d, roles, src.templated)
            out.append((n, fmt, pair, problem))
    # a row that failed before its format was known (a mapped key missing, a rule's data wrong) counts as the
    # format of the rows around it
    layouts = Counter(fmt for _, fmt, _, _ in out if fmt not in ("unknown", "tie", "?"))
    main = layouts.most_common(1)[0][0] if layouts else "unknown"
    return sorted(((n, main if fmt == "?" else fmt, p, why) for n, fmt, p, why in out), key=lambda x: x[0]), notes


def _check_columns(src: SourceConfig, raw: list) -> None:
    """A mapped or ignored key that no row has is a mistake in the mapping, not a column of bad rows."""
    for k, v in (src.columns or {}).items():
        if k in ("role", "content"):
            continue
        if not any(isinstance(r, dict) and v in r for r in raw):
            raise DataError(f"{src.label}: columns.{k} = {v!r}, but no row has the key {v!r}; {_first_keys(raw)}")
    for k in src.ignore or ():
        if not any(isinstance(r, dict) and k in r for r in raw):
            raise DataError(f"{src.label}: ignore lists {k!r}, but no row has that key; {_first_keys(raw)}")


def _unknown(src: SourceConfig, raw: list, results: list) -> str:

    first = next((r for r in raw if not isinstance(r, BadRow)), raw[0])
    keys = set(first) if isinstance(first, dict) else set()
    if src.pairs_from:
        return (f"{src.label}: pairs_from = \"{src.pairs_from}\" reads {EXPECTED[src.pairs_from]}; {_first_keys(raw)}. "
                "Map the keys with `columns = {...}`" + (f" (row 1: {results[0][3]})" if results[0][1] != "unknown" else ""))
    unpaired = [k for k in ("label", "is_desirable", "is_safe", "kto_tag") if k in keys]
    if unpaired and keys & {"completion", "response", "output", "answer", "chosen", "rejected", "messages", "conversations"}:
        prompts = {json.dumps(r.get("prompt"), sort_keys=True) for r in raw if isinstance(r, dict)}
        how = (f"pairs_from = \"scores\" with score_key = \"{unpaired[0]}\" pairs the answers of each prompt "
               f"({len(prompts)} prompts in {len(raw)} rows)" if "prompt" in keys and len(prompts) < len(raw) else
               "pairs_from = \"scores\" can build pairs if the rows have several scored answers per prompt")
        return (f"{src.label}: unpaired data ({_first_keys(raw)}; `{unpaired[0]}` marks one answer good or bad, as KTO "
                f"reads it): DPO needs a chosen and a rejected answer per prompt; {how}")
    hint = next((rule for rule in RULES if layout_of(first, rule) != "unknown"), None)
    if hint:
        return (f"{src.label}: no pairs in the rows yet ({_first_keys(raw)}); set pairs_from = \"{hint}\" to build them "
                "(see docs/data-formats.md)")
    return f"{src.label}: unrecognised format: {_first_keys(raw)}. lora-sdpo reads: {ACCEPTED}"


def _first_keys(raw: list, n: int = 10) -> str:
    first = next((r for r in raw if not isinstance(r, BadRow)), raw[0])
    if not isinstance(first, dict):
        return f"row 1 is a JSON {type(first).__name__}, not an object of fields"
    keys = list(map(str, first))
    shown = ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")
    return f"row 1 has the keys {shown or '(none)'}"


def load_step_pairs(recipe: LoadedRecipe, index: int) -> PairSet:
    """D_t for step `index` (0-based) under the recipe's split strategy."""
    return load_pairs(recipe.recipe.steps[index].sources, recipe, recipe.recipe.data.max_bad_fraction)


def load_eval_pairs(recipe: LoadedRecipe) -> PairSet | None:
    if not recipe.recipe.data.eval:
        return None
    return load_pairs(recipe.recipe.data.eval, recipe, recipe.recipe.data.max_bad_fraction)


def template_markers(tokenizer) -> dict[str, str]:
    """The model's own chat-template markers: its special and added tokens that its chat template writes literally."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return {}
    tokens = [*(getattr(tokenizer, "all_special_tokens", None) or []), *tokenizer.get_added_vocab()]
    return {t: "this model's template" for t in tokens if isinstance(t, str) and len(t) > 2 and t in template}


def takes_tools(tokenizer) -> bool:
    """Whether the model's chat template renders `tools` (a template that ignores them gives the same text)."""
    msgs = [{"role": "user", "content": "Hi"}]
    tool = [{"type": "function", "function": {"name": "probe_tool_name", "description": "d", "parameters": {"type": "object", "properties": {}}}}]
    try:
        plain = tokenizer.apply_chat_template(msgs, tokenize=False)
        with_tools = tokenizer.apply_chat_template(msgs, tools=tool, tokenize=False)
    except Exception:  # a template that raises on tools does not take them
        return False
    return plain != with_tools


def check_with_tokenizer(pairs: PairSet, tokenizer) -> None:
    """What needs the model's tokenizer: `tools` need a chat template that renders them, and a prompt that holds the
    model's own template markers would be wrapped twice."""
    with_tools = [r for r in pairs.rows if r.get("tools")]
    if with_tools and not takes_tools(tokenizer):
        where = ", ".join(f"{r['source']} row {r['row']}" for r in with_tools[:3])
        raise DataError(f"{len(with_tools)} pairs carry `tools` ({where}), but this model's chat template takes no tools "
                        "(it renders the same text with and without them), so the model would never see them: use a model "
                        "whose template renders tools, or list the key in the source's ignore = [...]")
    own = template_markers(tokenizer)
    templated = [(r, why) for r in pairs.rows if not isinstance(r["chosen"], str) and (why := templated_problem(r, own))]
    if templated:
        where = ", ".join(f"{r['source']} row {r['row']}" for r, _ in templated[:3])
        raise DataError(f"{len(templated)} pairs ({where}): {templated[0][1]}")


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
        ps = load_step_pairs(recipe, i)
        check_with_tokenizer(ps, tokenizer)
        ps, dropped = drop_overlong(ps, tokenizer, t.max_length, frac)
        if not ps.rows:
            raise DataError(f"step {i + 1}: no pairs left after dropping bad rows; check its sources")
        steps.append(ps)
        overlong += [f"{s} row {n}" for s, n in dropped]
    d = recipe.recipe.data
    steps = apply_split(d.split, steps, d.fractions, recipe.recipe.run.seed, score)
    ev = load_eval_pairs(recipe)
    if ev is not None:
        check_with_tokenizer(ev, tokenizer)
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
    from .trl_compat import common_prefix_length, tokenize as _tokenize

    if isinstance(row["chosen"], list):
        tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
        kw = {"tools": tools} if tools else {}  # as TRL's DPOTrainer passes a row's `tools` to the chat template
        prompt = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True, **kw)["input_ids"]
        chosen = _tokenize(tokenizer, row["prompt"] + row["chosen"], **kw)["input_ids"]
        rejected = _tokenize(tokenizer, row["prompt"] + row["rejected"], **kw)["input_ids"]
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
