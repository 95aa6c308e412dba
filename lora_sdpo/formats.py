"""What a row means: its format recognised from its keys, and the row normalised to one pair shape.

The pair shape is TRL's conversational preference format:
    {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message]}
so the tokenizer's chat template is applied by TRL exactly as in a plain DPOTrainer run. String
transcripts without roles stay TRL's standard string format. Anthropic HH transcripts
("\\n\\nHuman: ... \\n\\nAssistant: ...") become conversations split at the last assistant turn, as
TRL's own hh-rlhf dataset script converts them. Roles are mapped by lora_sdpo/roles.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import Bad
from .readers import CellError
from .roles import ROLES, TRAINED, map_role

# `columns = {...}` of a source: the names a row's keys can be mapped to
COLUMNS = ("prompt", "chosen", "rejected", "system", "question", "instruction", "input", "history", "tools",
           "conversations", "prompt_messages",
           "chosen_messages", "rejected_messages", "completions", "scores", "ranks", "response_a", "response_b",
           "winner", "preference", "role", "content")

FORMAT_KEYS = {
    "messages": ("chosen_messages", "rejected_messages"),
    "openai": ("input", "preferred_output", "non_preferred_output"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "orca": ("question", "chosen", "rejected"),
    "alpaca": ("instruction", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "standard": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}

# The keys each format reads: its own (FORMAT_KEYS) and the prompt parts it joins to them. A key of a row that
# is in none of these, nor mapped, known metadata or ignored, is checked by lora_sdpo/contract.py.
PARTS = ("system", "history", "tools")
READS = {
    "messages": {"chosen_messages", "rejected_messages", "prompt_messages", *PARTS},
    "openai": {"input", "preferred_output", "non_preferred_output", "tools"},
    "sharegpt": {"conversations", "chosen", "rejected", *PARTS},
    "orca": {"question", "chosen", "rejected", "input", *PARTS},
    "alpaca": {"instruction", "chosen", "rejected", "input", *PARTS},
    "conversational": {"prompt", "chosen", "rejected", *PARTS},
    "standard": {"prompt", "chosen", "rejected", "input", *PARTS},
    "hh": {"chosen", "rejected"},
    "implicit": {"chosen", "rejected"},
}

# Chat-template markers of well-known formats: a prompt that holds one was rendered for some model already.
TEMPLATE_MARKERS = {
    "<|im_start|>": "ChatML", "<|im_end|>": "ChatML", "[INST]": "Llama 2 / Mistral", "<<SYS>>": "Llama 2",
    "<|start_header_id|>": "Llama 3", "<|eot_id|>": "Llama 3", "<|user|>": "phi-3 / Zephyr",
    "<|assistant|>": "phi-3 / Zephyr", "<|system|>": "phi-3 / Zephyr", "<|end|>": "phi-3",
    "<extra_id_0>": "NeMo", "<extra_id_1>": "NeMo", "<start_of_turn>": "Gemma", "<|endoftext|>": "GPT",
    "### Instruction:": "Alpaca", "### Response:": "Alpaca",
}

ACCEPTED = (
    "TRL standard or conversational (prompt, chosen, rejected), implicit prompt (chosen, rejected: full transcripts, "
    "Anthropic HH's \\n\\nHuman:/\\n\\nAssistant: among them), OpenAI (input, preferred_output, non_preferred_output), "
    "Orca (system, question, chosen, rejected), Alpaca (instruction, input, chosen, rejected), ShareGPT (conversations, chosen, rejected), message lists "
    "(chosen_messages, rejected_messages, optional prompt_messages); other key names through `columns = {...}`, "
    "scored, ranked or judged answers through `pairs_from`"
)


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
        if m["role"] not in TRAINED:
            return (f"{what}[{i}] has the role {m['role']!r}, which chat templates do not know; map it with "
                    f"roles = {{ {m['role']} = \"user\" }} (or \"assistant\", \"system\")")
    return None


def _sharegpt(msgs: Any, what: str) -> list[dict]:
    """ShareGPT turns ({from, value}, or {role, content}) as messages; an answer may be a plain string."""
    if isinstance(msgs, str) and what != "conversations":
        return [_msg("assistant", msgs)]
    if isinstance(msgs, dict):
        msgs = [msgs]
    if not isinstance(msgs, list):
        raise Bad(f"`{what}` is {type(msgs).__name__}, not a list of turns ({{\"from\": ..., \"value\": ...}})")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Bad(f"`{what}`[{i}] is {type(m).__name__}, not a turn ({{\"from\": ..., \"value\": ...}})")
        out.append(_msg(m.get("from", m.get("role")), m.get("value", m.get("content"))))
    return out


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
                raise Bad(f"{what}[{i}].content[{j}] is a part of type {kind!r}; only text parts can be trained on")
            texts.append(text)
        out.append({"role": m.get("role"), "content": "".join(texts)})
    return out


def _turns(v: Any, what: str) -> Any:
    """A prompt given as a list of strings (turns, as LMSYS Arena and JSON cells of CSV files hold them) as
    messages: user, assistant, user, ...; message lists and strings as they came."""
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        if len(v) % 2 == 0:
            raise Bad(f"`{what}` is a list of {len(v)} strings; as turns (user, assistant, ...) it must end with a user turn")
        return [_msg("user" if i % 2 == 0 else "assistant", x) for i, x in enumerate(v)]
    return v


def _answer(v: Any, what: str) -> Any:
    """A completion: a message list as it came, a string (or a list of one string) as one assistant message."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if isinstance(v, str):
        return [_msg("assistant", v)]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        raise Bad(f"`{what}` is a list of {len(v)} strings; a completion is one answer")
    if isinstance(v, dict):  # one message
        return [v]
    return _parts(v, what)


def is_hh(s: Any) -> bool:
    """An Anthropic HH transcript: "\\n\\nHuman: ... \\n\\nAssistant: ..." (the leading newlines may be missing)."""
    return isinstance(s, str) and s.lstrip().startswith("Human:") and "\n\nAssistant:" in s


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
    if {"instruction", "chosen", "rejected"} <= keys:
        return "alpaca"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "conversational" if isinstance(row["chosen"], list) or isinstance(row["prompt"], list) else "standard"
    if {"chosen", "rejected"} <= keys:
        return "hh" if is_hh(row["chosen"]) or is_hh(row["rejected"]) else "implicit"
    return "unknown"


def normalise(row: Any, roles: dict[str, str] = ROLES, templated: str = "refuse") -> tuple[str, dict | None, str | None]:
    """(format, pair, None) for a good row, (format, None, reason) for a bad one. `templated = "verbatim"`: the
    prompt is text already rendered in a chat format, used as it is (TRL's string format: no second template)."""
    if not isinstance(row, dict):
        return "unknown", None, "row is not an object"
    fmt = detect_format(row)
    cell = next((v for v in row.values() if isinstance(v, CellError)), None)
    if cell is not None:
        return fmt, None, str(cell)
    try:
        pair = _to_pair(fmt, row)
        if fmt in READS and isinstance(pair.get("prompt"), list):
            pair = _with_parts(fmt, row, pair)
    except Bad as e:
        return fmt, None, str(e)
    if not isinstance(pair["chosen"], str):
        pair = {k: _map_roles(v, roles) for k, v in pair.items()}
    problem = _check_pair(pair)
    if problem is None:
        try:
            pair = _verbatim(pair) if templated == "verbatim" else pair
        except Bad as e:
            return fmt, None, str(e)
        if templated != "verbatim":
            problem = templated_problem(pair)
    return fmt, pair, problem


def _with_parts(fmt: str, row: dict, pair: dict) -> dict:
    """The prompt parts a format reads beside its own keys: a `system` message first (unless the prompt has one),
    `history` turns after it and before the prompt's own messages, and `tools` for the chat template."""
    reads = READS[fmt]
    prompt = pair["prompt"]
    if "system" in reads:
        prompt = _system(row, prompt)
    if "history" in reads:
        hist = _history(row.get("history"))
        if hist:
            k = 1 if prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system" else 0
            prompt = [*prompt[:k], *hist, *prompt[k:]]
    out = {**pair, "prompt": prompt}
    tools = _tools(row.get("tools")) if "tools" in reads else None
    if tools is not None:
        out["tools"] = tools
    return out


def _history(h: Any) -> list[dict]:
    """Earlier turns: a list of [question, answer] pairs (LLaMA-Factory's `history`) or a list of messages."""
    if h is None or h == "" or h == []:
        return []
    if isinstance(h, str):
        try:
            h = json.loads(h)
        except json.JSONDecodeError:
            raise Bad("`history` is text, not a list of [question, answer] pairs or of messages") from None
    if isinstance(h, list) and all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in h):
        return [m for q, a in h for m in (_msg("user", q), _msg("assistant", a))]
    if isinstance(h, list) and all(isinstance(m, dict) for m in h):
        return _sharegpt(h, "history")
    raise Bad("`history` is neither a list of [question, answer] pairs nor a list of messages")


def _tools(t: Any) -> str | None:
    """Function schemas for the chat template (transformers' apply_chat_template(tools=...)), kept as JSON text,
    which TRL's DPOTrainer reads back the same way; None when the row has none."""
    if t is None or t == "" or t == []:
        return None
    if isinstance(t, str):
        try:
            t = json.loads(t)
        except json.JSONDecodeError as e:
            raise Bad(f"`tools` is text that is not JSON ({e.msg}); it must be a list of function schemas") from None
    if isinstance(t, dict):
        t = [t]
    if not isinstance(t, list) or not all(isinstance(x, dict) for x in t):
        raise Bad("`tools` is not a list of function schemas (JSON objects)")
    return json.dumps(t, ensure_ascii=False) if t else None


def _text_of(part: Any) -> str:
    if isinstance(part, str):
        return part
    return "\n".join(m["content"] for m in part if isinstance(m, dict) and isinstance(m.get("content"), str))


def templated_problem(pair: dict, markers: dict[str, str] = TEMPLATE_MARKERS) -> str | None:
    """A prompt that already holds chat-template markers would be wrapped in the model's template a second time.
    A pair of strings (TRL's string format) gets no template: its text is trained on as it is."""
    if not isinstance(pair.get("prompt"), list):
        return None
    text = _text_of(pair["prompt"])
    found = [m for m in markers if m in text]
    if not found:
        return None
    names = ", ".join(f"{m} ({markers[m]})" for m in found[:3])
    return (f"the prompt is already in a chat template (it holds {names}); the model's own template would wrap it "
            "a second time: set templated = \"verbatim\" to train on the text as it is, or give the rows untemplated")


def _verbatim(pair: dict) -> dict:
    """A pair whose prompt is already rendered: TRL's string format (prompt + completion, no chat template)."""
    if "tools" in pair:
        raise Bad("templated = \"verbatim\" cannot pass `tools` to a chat template; render them into the prompt")
    out = {}
    for k, v in (("prompt", pair["prompt"]), ("chosen", pair["chosen"]), ("rejected", pair["rejected"])):
        if isinstance(v, list):
            if len(v) != 1:
                raise Bad(f"templated = \"verbatim\" reads the {k} as one text, but it is {len(v)} messages")
            v = v[0]["content"]
        out[k] = v
    return out


def _map_roles(msgs: Any, roles: dict[str, str]) -> Any:
    if not isinstance(msgs, list):
        return msgs
    out = []
    for m in msgs:
        if isinstance(m, dict) and isinstance(m.get("role"), str) and map_role(m["role"], roles) != m["role"]:
            m = {**m, "role": map_role(m["role"], roles)}
        out.append(m)
    return out


def _need_str(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise Bad(f"`{key}` is {'missing' if v is None else type(v).__name__}, not a string")
    return v


def _system(row: dict, prompt: list[dict]) -> list[dict]:
    """A `system` column as the prompt's first message (unless the prompt messages begin with one)."""
    if row.get("system") and not (prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system"):
        return [_msg("system", _need_str(row, "system")), *prompt]
    return prompt


def _input(row: dict, text: str) -> str:
    """An instruction with its extra `input` (Alpaca's) joined after a blank line, as AlpacaEval's rows are read."""
    extra = row.get("input")
    if extra is None or extra == "":
        return text
    if not isinstance(extra, str):
        raise Bad(f"`input` is {type(extra).__name__}, not a string")
    return f"{text}\n\n{extra}" if extra.strip() else text


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_dialogue(text: str, what: str) -> tuple[list[dict], str]:
    """(history messages, last assistant answer) of an HH transcript."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    if parts[0].strip():
        raise Bad(f"`{what}` has text before its first Human:/Assistant: turn")
    turns = [_msg("user" if parts[i] == "Human" else "assistant", parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if not turns:
        raise Bad(f"`{what}` has no Human:/Assistant: turns (the other side of the row has)")
    if turns[-1]["role"] != "assistant":
        raise Bad(f"`{what}` ends with a Human turn, not an Assistant answer")
    if len(turns) < 2:
        raise Bad(f"`{what}` has no Human turn before its Assistant answer")
    return turns[:-1], turns[-1]["content"]


def _hh(row: dict) -> dict:
    hc, c = _hh_dialogue(_need_str(row, "chosen"), "chosen")
    hr, r = _hh_dialogue(_need_str(row, "rejected"), "rejected")
    if hc != hr:
        k = next((i for i, (a, b) in enumerate(zip(hc, hr)) if a != b), min(len(hc), len(hr)))
        raise Bad(f"chosen and rejected differ before their last Assistant turn (turn {k + 1} of "
                  f"{max(len(hc), len(hr))}): they answer different dialogues")
    return {"prompt": hc, "chosen": [_msg("assistant", c)], "rejected": [_msg("assistant", r)]}


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
        prompt = [_msg("user", _input(row, _need_str(row, "question")))]
        return {
            "prompt": prompt,
            "chosen": [_msg("assistant", _need_str(row, "chosen"))],
            "rejected": [_msg("assistant", _need_str(row, "rejected"))],
        }
    if fmt == "sharegpt":
        return {"prompt": _sharegpt(row["conversations"], "conversations"), "chosen": _sharegpt(row["chosen"], "chosen"),
                "rejected": _sharegpt(row["rejected"], "rejected")}
    if fmt in ("standard", "alpaca"):
        key = "prompt" if fmt == "standard" else "instruction"
        return {
            "prompt": [_msg("user", _input(row, _need_str(row, key)))],
            "chosen": [_msg("assistant", _need_str(row, "chosen"))],
            "rejected": [_msg("assistant", _need_str(row, "rejected"))],
        }
    if fmt == "conversational":
        prompt = _parts(_turns(row["prompt"], "prompt"), "prompt")
        if isinstance(prompt, list):  # prompt messages; answers as messages or strings
            return {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"),
                    "rejected": _answer(row["rejected"], "rejected")}
        chosen, rejected = _parts(row["chosen"], "chosen"), _parts(row["rejected"], "rejected")
        if not isinstance(rejected, list):
            raise Bad("`chosen` is a message list but `rejected` is not")
        _nonempty(chosen, rejected)
        # UltraFeedback binarized: a prompt string and full transcripts that repeat it.
        if isinstance(prompt, str):
            ex = extract_prompt({"chosen": chosen, "rejected": rejected})
            if not ex["prompt"]:
                raise Bad("chosen and rejected transcripts share no prompt messages")
            return ex
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "hh":
        return _hh(row)
    if fmt == "implicit":
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, str) and isinstance(rejected, str):
            if chosen != rejected and (chosen.startswith(rejected) or rejected.startswith(chosen)):
                raise Bad("one completion is a prefix of the other, so there is no point where the prompt ends")
            ex = extract_prompt({"chosen": chosen, "rejected": rejected})
            if not ex["prompt"].strip():
                raise Bad("chosen and rejected share no common prompt prefix")
            return ex
        if isinstance(chosen, list) and isinstance(rejected, list):
            chosen, rejected = _parts(chosen, "chosen"), _parts(rejected, "rejected")
            _nonempty(chosen, rejected)
            short, long_ = sorted((chosen, rejected), key=len)
            if chosen != rejected and long_[: len(short)] == short:
                raise Bad("one transcript is a prefix of the other, so there is no point where the prompt ends")
            ex = extract_prompt({"chosen": chosen, "rejected": rejected})
            if not ex["prompt"]:
                raise Bad("chosen and rejected transcripts share no prompt messages")
            return ex
        raise Bad("`chosen` and `rejected` must both be strings or both message lists")
    raise Bad("unrecognised format")


def _nonempty(chosen: Any, rejected: Any) -> None:
    """Transcripts TRL's extract_prompt can read: non-empty lists (it fails on an empty one)."""
    for k, v in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, list) or not v:
            raise Bad(f"`{k}` is {'an empty list' if v == [] else type(v).__name__}, not a transcript (a list of messages)")


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


def split_inside(pair: dict) -> bool:
    """A string pair whose common-prefix split (TRL's extract_prompt) falls inside a word or a line: the answers'
    shared start went into the prompt (the prompt does not end at a line break or a role marker such as "A:")."""
    if not isinstance(pair.get("prompt"), str):
        return False
    tail = pair["prompt"].rstrip(" \t")
    if not tail or tail.endswith(("\n", ":")):
        return False
    return not (pair["chosen"].startswith("\n") and pair["rejected"].startswith("\n"))


# ----------------------------------------------------------------------------- column mapping


def apply_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """A row with its keys renamed by a source's `columns = {prompt = "context", ...}` (role/content: the keys of
    each message). A row that lacks a mapped key is bad, naming the key and the mapping."""
    if not columns or not isinstance(row, dict):
        return row
    fields = {k: v for k, v in columns.items() if k not in ("role", "content")}
    missing = [f"`{v}` (columns.{k})" for k, v in fields.items() if v not in row]
    if missing:
        raise Bad(f"missing {', '.join(missing)}")
    out = {k: v for k, v in row.items() if k not in fields.values() and k not in fields}
    out.update({k: row[v] for k, v in fields.items()})
    if "role" in columns or "content" in columns:
        rk, ck = columns.get("role", "role"), columns.get("content", "content")
        out = {k: _rename_message_keys(v, rk, ck) for k, v in out.items()}
    return out


def _rename_message_keys(v: Any, rk: str, ck: str) -> Any:
    def one(m):
        if isinstance(m, dict) and (rk in m or ck in m):
            return {("role" if k == rk else "content" if k == ck else k): x for k, x in m.items()}
        return m

    if isinstance(v, dict):
        if isinstance(v.get("messages"), list):  # OpenAI's input.messages
            return {**v, "messages": [one(m) for m in v["messages"]]}
        return one(v)
    return [one(m) for m in v] if isinstance(v, list) else v
