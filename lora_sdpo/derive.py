"""Pairs derived by a stated rule from rows that hold no pair yet (a source's `pairs_from`).

scores    several answers per prompt, each with a score: chosen = the highest (the first of equals),
          rejected = the lowest, or a random lower one (`pick_rejected = "random"`, seeded per row);
          UltraFeedback's raw `completions` follow UltraFeedback binarized: highest `overall_score`
          vs a random lower one. A row whose answers all score the same is a tie. Rows of one answer
          each (HelpSteer; KTO's label as the score) are grouped by prompt first.
ranking   answers with a rank (lower is better, OpenAssistant's `rank`): best vs worst, or every
          adjacent pair (`ranking_pairs = "adjacent"`); OpenAssistant message trees give the pairs of
          every prompter message with ranked replies, the dialogue above it as the prompt.
judgment  two answers and a verdict: AlpacaEval's `preference` (1 or 2; 1.5 is a tie), LMSYS Arena's
          `winner_model_a` / `winner_model_b` / `winner_tie`, or a `winner` column ("a"/"b",
          "model_a"/"model_b", 1/2, "tie"). Ties are dropped and counted.

Each rule returns rows in a format lora_sdpo/formats.py reads (prompt, chosen, rejected), so a derived
pair is normalised and checked like any other.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .errors import Bad

TEXT_KEYS = ("response", "text", "content", "output", "answer", "completion", "value")
RULES = ("scores", "ranking", "judgment")


class Derived:
    """What one row gave: the layout recognised, the pair rows, whether it was a tie, and what the rule dropped
    or chose in it (counted by reason in the data report)."""

    def __init__(self, layout: str, rows: list[dict] | None = None, tie: bool = False, notes: list[str] | None = None):
        self.layout, self.rows, self.tie, self.notes = layout, rows or [], tie, notes or []


def derive(row: Any, rule: str, src, seed: int, n: int) -> Derived:
    """The pairs of row `n` (1-based) under `rule`; raises formats.Bad with the reason for a bad row."""
    if not isinstance(row, dict):
        raise Bad("row is not an object")
    return {"scores": _scores, "ranking": _ranking, "judgment": _judgment}[rule](row, src, random.Random(f"{seed}/{n}"))


def layout_of(row: Any, rule: str) -> str:
    """The layout a row is read as under `rule` ("unknown" when none fits)."""
    if not isinstance(row, dict):
        return "unknown"
    keys = set(row)
    if rule == "scores":
        if {"instruction", "completions"} <= keys:
            return "ultrafeedback"
        return "completions" if {"prompt", "completions"} <= keys else "unknown"
    if rule == "ranking":
        if {"message_id", "parent_id", "role", "text"} <= keys:  # one message a row: load_pairs assembles the trees
            return "oasst-messages"
        if isinstance(row.get("prompt"), dict) and "replies" in row["prompt"] or {"role", "replies"} <= keys:
            return "oasst-tree"
        return "completions" if {"prompt", "completions"} <= keys else "unknown"
    if {"instruction", "output_1", "output_2", "preference"} <= keys:
        return "alpaca-eval"
    if {"response_a", "response_b"} <= keys and ({"winner_model_a", "winner_model_b"} <= keys or "winner" in keys):
        return "arena"
    if {"conversation_a", "conversation_b", "winner"} <= keys:
        return "arena-conversations"
    if {"prompt", "response_a", "response_b", "preference"} <= keys:
        return "response_a/response_b"
    return "unknown"


EXPECTED = {
    "scores": "UltraFeedback (instruction, completions with overall_score) or prompt + completions (a list of "
              "answers with a score, or of strings with a parallel `scores` list) or one answer a row (prompt, response, "
              "a score)",
    "ranking": "OpenAssistant message trees (replies with rank) or prompt + completions (answers with a rank, or "
               "strings with a parallel `ranks` list; lower is better)",
    "judgment": "AlpacaEval (instruction, output_1, output_2, preference), LMSYS Arena (prompt, response_a, "
                "response_b, winner_model_a/winner_model_b/winner_tie or winner), Chatbot Arena conversations "
                "(conversation_a, conversation_b, winner) or prompt, response_a, response_b, preference",
}


def _text(item: Any, what: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for k in TEXT_KEYS:
            if isinstance(item.get(k), str):
                return item[k]
        raise Bad(f"{what} has no answer text (keys {', '.join(map(str, list(item)[:10]))}; looked for {', '.join(TEXT_KEYS)})")
    raise Bad(f"{what} is {type(item).__name__}, not an answer")


def as_number(v: Any) -> float | None:
    if isinstance(v, bool):  # KTO's label: a desirable answer scores 1, an undesirable one 0
        return float(v)
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if v == v else None  # NaN: no score
    if isinstance(v, str):
        try:
            return as_number(float(v))
        except ValueError:
            return None
    return None


def _scored(row: dict, list_key: str, parallel: str, key: str, notes: list[str] | None = None) -> list[tuple[str, float]]:
    """(text, value) of every answer that has a numeric value, in the row's order; the answers left out (no
    value, empty text) are noted."""
    items = row[list_key]
    if isinstance(items, str):
        try:
            items = json.loads(items)
        except json.JSONDecodeError:
            pass
    if not isinstance(items, list):
        raise Bad(f"`{list_key}` is {type(items).__name__}, not a list of answers")
    if items and all(isinstance(x, str) for x in items):
        values = row.get(parallel)
        if not isinstance(values, list) or len(values) != len(items):
            raise Bad(f"`{list_key}` is a list of strings, so `{parallel}` needs one value per answer")
        pairs = list(zip(items, values))
    else:
        pairs = [(_text(x, f"{list_key}[{i}]"), x.get(key) if isinstance(x, dict) else None) for i, x in enumerate(items)]
    out = [(t, v) for t, v in ((t, as_number(v)) for t, v in pairs) if v is not None and t.strip()]
    if notes is not None and len(out) < len(pairs):
        notes.append(f"answers without a numeric `{key if parallel not in row else parallel}` or without text left out")
    if len(out) < 2:
        raise Bad(f"fewer than two answers in `{list_key}` with a numeric `{key if parallel not in row else parallel}`")
    return out


PROMPT_PARTS = ("system", "history", "tools")


def _prompt(row: dict, key: str) -> dict:
    """The prompt of a derived pair: `key`'s value, Alpaca's `input` joined to it after a blank line (as
    lora_sdpo/formats.py joins it), and the parts the pair's format reads (system, history, tools)."""
    out = {"prompt": row.get(key)}
    extra = row.get("input")
    if extra is not None and extra != "":
        if not isinstance(extra, str):
            raise Bad(f"`input` is {type(extra).__name__}, not a string")
        if not isinstance(out["prompt"], str):
            raise Bad(f"`input` can be joined only to a text prompt; `{key}` is {type(out['prompt']).__name__}")
        if extra.strip():
            out["prompt"] = f"{out['prompt']}\n\n{extra}"
    for k in PROMPT_PARTS:
        if row.get(k) is not None and row.get(k) != "" and row.get(k) != []:
            out[k] = row[k]
    return out


def _scores(row: dict, src, rng: random.Random) -> Derived:
    layout = layout_of(row, "scores")
    if layout == "unknown":
        raise Bad("unknown")
    ultra = layout == "ultrafeedback"
    key = src.score_key or ("overall_score" if ultra else "score")
    notes: list[str] = []
    answers = _scored(row, "completions", "scores", key, notes)
    best = max(v for _, v in answers)
    chosen = next(t for t, v in answers if v == best)
    lower = [(t, v) for t, v in answers if v < best]
    if not lower:
        return Derived(layout, tie=True, notes=notes)
    if sum(v == best for _, v in answers) > 1:
        notes.append("several answers share the top score: the first is chosen")
    pick = src.pick_rejected or ("random" if ultra else "lowest")
    if pick == "random" and len(lower) > 1:
        notes.append("rejected drawn at random (seeded) among the lower-scored answers")
    elif pick == "lowest" and sum(v == min(x for _, x in lower) for _, v in lower) > 1:
        notes.append("several answers share the lowest score: the first is rejected")
    rejected = rng.choice(lower)[0] if pick == "random" else min(lower, key=lambda tv: tv[1])[0]
    if len(answers) > 2 and pick == "lowest":
        notes.append("answers between the highest and the lowest score not used")
    return Derived(layout, [{**_prompt(row, "instruction" if ultra else "prompt"), "chosen": chosen, "rejected": rejected}], notes=notes)


def _ranked_pairs(ranked: list[tuple[Any, float]], how: str) -> tuple[list[tuple[Any, Any]], bool]:
    """(better, worse) pairs of answers sorted by rank (lower is better); True when every rank is equal."""
    ranked = sorted(ranked, key=lambda tv: tv[1])
    if ranked[0][1] == ranked[-1][1]:
        return [], True
    if how == "adjacent":
        return [(a, b) for (a, ra), (b, rb) in zip(ranked, ranked[1:]) if ra < rb], False
    return [(ranked[0][0], ranked[-1][0])], False


def _ranking(row: dict, src, rng: random.Random) -> Derived:
    layout = layout_of(row, "ranking")
    if layout in ("unknown", "oasst-messages"):
        raise Bad("unknown")
    how = src.ranking_pairs
    if layout == "oasst-tree":
        root = row["prompt"] if isinstance(row.get("prompt"), dict) else row
        rows, ties = [], [0]
        _walk(root, [], src.score_key or "rank", how, rows, ties)
        if not rows and ties[0]:
            return Derived(layout, tie=True)
        if not rows:
            raise Bad("no prompter message in the tree has two or more ranked replies")
        return Derived(layout, rows)
    notes: list[str] = []
    ranked = _scored(row, "completions", "ranks", src.score_key or "rank", notes)
    pairs, tie = _ranked_pairs(ranked, how)
    if tie:
        return Derived(layout, tie=True, notes=notes)
    if how != "adjacent" and len(ranked) > 2:
        notes.append("answers ranked between the best and the worst not used (ranking_pairs = \"best_worst\")")
    return Derived(layout, [{**_prompt(row, "prompt"), "chosen": a, "rejected": b} for a, b in pairs], notes=notes)


def _walk(node: dict, history: list[dict], key: str, how: str, rows: list[dict], ties: list[int]) -> None:
    """Every prompter message of an OpenAssistant tree with ranked assistant replies gives pairs; the dialogue
    down to it is the prompt."""
    text, role = node.get("text"), node.get("role")
    if not isinstance(text, str) or role not in ("prompter", "assistant"):
        raise Bad(f"a message of the tree has no text/role (keys {', '.join(map(str, list(node)[:10]))})")
    here = [*history, {"role": "user" if role == "prompter" else "assistant", "content": text}]
    replies = node.get("replies") or []
    if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
        raise Bad("a message of the tree has `replies` that are not a list of messages")
    if role == "prompter":
        ranked = [(r["text"], as_number(r.get(key))) for r in replies if isinstance(r.get("text"), str) and r.get("role") == "assistant"]
        ranked = [(t, v) for t, v in ranked if v is not None]
        if len(ranked) >= 2:
            pairs, tie = _ranked_pairs(ranked, how)
            ties[0] += tie
            rows += [{"prompt": here, "chosen": a, "rejected": b} for a, b in pairs]
    for r in replies:
        _walk(r, here, key, how, rows, ties)


ANSWER_KEYS = ("completion", "response", "output", "answer")


def group_answers(raw: list, score_key: str) -> list[tuple[int, dict]] | None:
    """One answer a row (`prompt`, an answer, its score: HelpSteer's layout, or KTO's with score_key = "label") as
    one row per prompt with its answers as `completions`, numbered by the prompt's first row; None for rows of
    another layout."""
    first = raw[0]
    if not isinstance(first, dict) or "prompt" not in first or "completions" in first or score_key not in first:
        return None
    text = next((k for k in ANSWER_KEYS if k in first), None)
    if text is None:
        return None
    groups: dict[str, tuple[int, dict]] = {}
    for n, r in enumerate(raw, 1):
        r = r if isinstance(r, dict) else {}
        answer = r.get(text)
        if isinstance(answer, list) and answer and isinstance(answer[-1], dict):  # a completion as messages
            answer = answer[-1].get("content")
        key = json.dumps(r.get("prompt"), sort_keys=True)
        g = groups.setdefault(key, (n, {"prompt": r.get("prompt"), "completions": [],
                                        **{k: r.get(k) for k in ("input", *PROMPT_PARTS) if k in r}}))
        g[1]["completions"].append({"text": answer if isinstance(answer, str) else "", score_key: r.get(score_key)})
    return list(groups.values())


def _is_id(v: Any) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def assemble_trees(raw: list) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]] | None:
    """OpenAssistant's flat export (one message a row: message_id, parent_id, role, text, rank) as trees:
    ([(row of the root, {"prompt": root}), ...], [(row, reason) of messages whose parent is missing]);
    None for rows of another layout. Deleted messages are left out, as in OpenAssistant's ready trees."""
    if not raw or not isinstance(raw[0], dict) or not {"message_id", "parent_id", "role", "text"} <= set(raw[0]):
        return None
    roots, orphans, nodes = [], [], {}
    for n, r in enumerate(raw, 1):
        if not isinstance(r, dict):
            orphans.append((n, "row is not an object"))
        elif not _is_id(r.get("message_id")):
            orphans.append((n, "`message_id` is missing or not an id (a string or a number)"))
        elif not r.get("deleted"):
            nodes[r["message_id"]] = {**r, "replies": []}
    for n, r in enumerate(raw, 1):
        if not isinstance(r, dict) or r.get("deleted") or not _is_id(r.get("message_id")):
            continue
        node, parent = nodes[r["message_id"]], r.get("parent_id")
        if parent is None:
            roots.append((n, {"prompt": node}))
        elif not _is_id(parent):
            orphans.append((n, "`parent_id` is not an id (a string or a number)"))
        elif parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            orphans.append((n, f"its parent message {parent} is not in the source (or deleted)"))
    return roots, orphans


def _cell(v: Any, what: str) -> Any:
    """Arena cells are JSON lists of turns written as strings."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise Bad(f"`{what}` starts like a JSON list but is not valid JSON ({e.msg})") from None
    return v


def _verdict(row: dict, layout: str) -> str | None:
    """"a", "b" or None (a tie); Bad when there is no verdict."""
    if layout == "arena" and "winner_model_a" in row:
        a, b, t = (as_number(row.get(k)) or 0 for k in ("winner_model_a", "winner_model_b", "winner_tie"))
        if (a, b) == (1, 0):
            return "a"
        if (a, b) == (0, 1):
            return "b"
        if t == 1 or (a, b) == (1, 1):
            return None
        raise Bad("winner_model_a / winner_model_b / winner_tie name no winner")
    if "winner" in row and layout != "response_a/response_b":
        w = row["winner"]
        w = w.strip().lower() if isinstance(w, str) else w
        if w in ("a", "model_a", 1, "1", "response_a"):
            return "a"
        if w in ("b", "model_b", 2, "2", "response_b"):
            return "b"
        if isinstance(w, str) and w.startswith("tie"):
            return None
        raise Bad(f"`winner` is {row['winner']!r}; expected a / b, model_a / model_b, 1 / 2 or tie")
    p = as_number(row.get("preference"))
    if p is None:
        raise Bad(f"`preference` is {row.get('preference')!r}, not 1 or 2")
    if p == 1.5 or p == 0:
        return None
    if 1 <= p < 1.5:
        return "a"
    if 1.5 < p <= 2:
        return "b"
    raise Bad(f"`preference` is {row.get('preference')!r}; expected 1 (first answer), 2 (second) or 1.5 (tie)")


def _judgment(row: dict, src, rng: random.Random) -> Derived:
    layout = layout_of(row, "judgment")
    if layout == "unknown":
        raise Bad("unknown")
    side = _verdict(row, layout)
    if side is None:
        return Derived(layout, tie=True)
    if layout == "alpaca-eval":
        a, b = row["output_1"], row["output_2"]
        base = _prompt(row, "instruction")  # with Alpaca's optional input
    elif layout == "arena-conversations":
        a, b = row["conversation_a"], row["conversation_b"]
        chosen, rejected = (a, b) if side == "a" else (b, a)
        return Derived(layout, [{"chosen": chosen, "rejected": rejected}])  # full transcripts: the implicit prompt
    else:
        base, a, b = _arena_turns(row) if layout == "arena" else (_prompt(row, "prompt"), row["response_a"], row["response_b"])
    chosen, rejected = (a, b) if side == "a" else (b, a)
    return Derived(layout, [{**base, "chosen": chosen, "rejected": rejected}])


def _arena_turns(row: dict) -> tuple[dict, Any, Any]:
    """LMSYS Arena: prompt, response_a and response_b are lists of turns; a multi-turn row is one dialogue only
    when both sides gave the same earlier answers (they never do when two models talked)."""
    if "prompt" not in row:
        raise Bad("`prompt` is missing")
    prompt, a, b = (_cell(row[k], k) for k in ("prompt", "response_a", "response_b"))
    if not isinstance(prompt, list):
        return _prompt(row, "prompt"), a, b
    for k, v in (("response_a", a), ("response_b", b)):
        if not isinstance(v, list) or len(v) != len(prompt):
            raise Bad(f"`{k}` has {len(v) if isinstance(v, list) else type(v).__name__} turns for the {len(prompt)} of `prompt`")
        if any(not isinstance(x, str) for x in v):
            raise Bad(f"`{k}` holds a turn that is not text (null: the model gave no answer)")
    if a[:-1] != b[:-1]:
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise Bad(f"response_a and response_b differ before their last turn (turn {k + 1} of {len(a)}): "
                  "the two sides answer different dialogues")
    turns = [t for i, q in enumerate(prompt) for t in ([q, a[i]] if i < len(prompt) - 1 else [q])]
    return {**_prompt({**row, "prompt": None}, "prompt"), "prompt": turns}, a[-1], b[-1]
