"""Nothing in a row is lost: every key read, mapped, known metadata or ignored (the row contract, lora_sdpo/
contract.py); the parts a prompt is made of (system, instruction + input, history, tools); prompts already in a
chat template; and no traceback on any mutation of a row of any recognised format, through `data` and `plan`.
Every row is written here; none is fetched."""

from __future__ import annotations

import copy
import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import MODEL, ORCA, ROOT, SHORT_SETTINGS, ULTRA, recipe_toml, write_jsonl
from lora_sdpo.cli import main
from lora_sdpo.data import check_with_tokenizer, load_pairs, takes_tools, tokenize_pair
from lora_sdpo.errors import DataError
from lora_sdpo.recipe import SourceConfig


def load(path: Path, **kw):
    return load_pairs([SourceConfig(path=str(path), **kw)], None, max_bad_fraction=1.0)


def pairs(tmp_path: Path, rows: list, **kw) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("source", "row")} for r in load(write_jsonl(tmp_path / "d.jsonl", rows), **kw).rows]


def user(t):
    return {"role": "user", "content": t}


def bot(t):
    return {"role": "assistant", "content": t}


def sysm(t):
    return {"role": "system", "content": t}


# ----------------------------------------------------------------------------- prompt parts


def test_sharegpt_with_string_answers_pairs_exactly(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"What is {i} + {i}?"}],
             "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."} for i in range(3)]
    got = pairs(tmp_path, rows)
    assert got == [{"prompt": [sysm("Be brief."), user(f"What is {i} + {i}?")], "chosen": [bot(f"It is {2 * i}.")],
                    "rejected": [bot(f"It is {2 * i + 1}.")]} for i in range(3)]


def test_instruction_and_input_both_in_the_prompt(tmp_path):
    rows = [{"instruction": "Rewrite the sentence in the passive voice.", "input": f"The cat chased mouse number {i}.",
             "chosen": f"Mouse number {i} was chased by the cat.", "rejected": "No."} for i in range(3)]
    want = [user(f"Rewrite the sentence in the passive voice.\n\nThe cat chased mouse number {i}.") for i in range(3)]
    assert [p["prompt"] for p in pairs(tmp_path, rows)] == [[w] for w in want]  # Alpaca's keys, as they are
    assert pairs(tmp_path, rows, ignore=["input"])[0]["prompt"] == [user(rows[0]["instruction"])]  # unless ignored
    renamed = [{"task": r["instruction"], "input": r["input"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    got = pairs(tmp_path, renamed, columns={"prompt": "task", "chosen": "good", "rejected": "bad"})
    assert [p["prompt"] for p in got] == [[w] for w in want]  # `input` is read beside a mapped prompt, not lost
    other = [{"q": r["instruction"], "ctx": r["input"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    got = pairs(tmp_path, other, columns={"prompt": "q", "input": "ctx"})
    assert [p["prompt"] for p in got] == [[w] for w in want]
    # a judgment file: the answers and a verdict, the prompt mapped from `instruction`; its `input` is read too
    judged = [{"instruction": r["instruction"], "input": r["input"], "response_a": r["rejected"], "response_b": r["chosen"],
               "preference": 2} for r in rows]
    got = pairs(tmp_path, judged, columns={"prompt": "instruction"}, pairs_from="judgment")
    assert [p["prompt"] for p in got] == [[w] for w in want] and got[0]["chosen"] == [bot(rows[0]["chosen"])]


@pytest.mark.parametrize("history", [
    [["First question?", "First answer."], ["Second question?", "Second answer."]],
    [user("First question?"), bot("First answer."), user("Second question?"), bot("Second answer.")],
    json.dumps([["First question?", "First answer."], ["Second question?", "Second answer."]]),  # a JSON cell
])
def test_history_turns_in_order(tmp_path, history):
    rows = [{"system": "Be kind.", "instruction": "Third question?", "history": history, "chosen": "Good.", "rejected": "Bad."}]
    assert pairs(tmp_path, rows)[0]["prompt"] == [sysm("Be kind."), user("First question?"), bot("First answer."),
                                                    user("Second question?"), bot("Second answer."), user("Third question?")]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TEMPLATE = ("{% if tools %}<|tools|>{{ tools | tojson }}<|end|>\n{% endif %}{% for m in messages %}<|{{ m['role'] }}|>\n"
                 "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@lru_cache(maxsize=1)
def pico_tokenizer():
    from lora_sdpo.model import load_tokenizer

    return load_tokenizer(MODEL)


def test_tools_reach_the_template_or_are_refused(tmp_path):
    rows = [{"prompt": [user(f"Weather in city {i}?")], "chosen": [bot("Action: get_weather(city)")], "rejected": [bot("I cannot.")],
             "tools": json.dumps(TOOLS) if i else TOOLS} for i in range(2)]  # a list, or JSON text
    ps = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert all(json.loads(r["tools"]) == TOOLS for r in ps.rows)
    tok = copy.deepcopy(pico_tokenizer())
    # the shipped pico model's template takes no tools: refused with the reason, never dropped in silence
    assert not takes_tools(tok)
    with pytest.raises(DataError, match="takes no tools"):
        check_with_tokenizer(ps, tok)
    # a template that renders tools gets them, as TRL's DPOTrainer passes a row's `tools`
    tok.chat_template = TOOL_TEMPLATE
    assert takes_tools(tok)
    check_with_tokenizer(ps, tok)
    t = tokenize_pair(ps.rows[0], tok)
    assert "get_weather" in tok.decode(t["prompt_ids"])
    want = tok.apply_chat_template([user("Weather in city 0?")], tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert t["prompt_ids"] == want["input_ids"]


def test_tools_refused_by_plan_on_the_pico_model(tmp_path):
    rows = [{"prompt": f"Weather in city {i}?", "chosen": "Action: get_weather", "rejected": "No.", "tools": TOOLS} for i in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_toml(data, settings=SHORT_SETTINGS))
    res = CliRunner().invoke(main, ["plan", str(recipe)])
    assert res.exit_code == 2 and "takes no tools" in res.output and "Traceback" not in res.output, res.output


# ----------------------------------------------------------------------------- the row contract


def test_unmapped_text_key_stops_the_run_and_ignore_lets_it_pass(tmp_path):
    rows = [{"prompt": f"Summarise the article about topic {i}.", "chosen": "A summary.", "rejected": "No.",
             "article": f"Topic {i} is a long story about many things that happened on day {i}.", "id": f"row-{i}"}
            for i in range(3)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load(f)
    msg = str(e.value)
    assert "`article`" in msg and "Topic 0 is a long story" in msg and 'columns = { input = "article" }' in msg
    assert 'ignore = ["article"]' in msg and "`id`" not in msg
    ps = load(f, ignore=["article"])
    assert ps.reports[0].keys.ignored == ["article"] and ps.reports[0].keys.unused == {"id": "label"}
    got = load(f, columns={"input": "article"})  # or read as the prompt's input
    assert got.rows[0]["prompt"][0]["content"].endswith("Topic 0 is a long story about many things that happened on day 0.")
    # the same through the CLI: one message, exit 2, no traceback; --ignore lets it pass
    res = CliRunner().invoke(main, ["data", str(f)])
    assert res.exit_code == 2 and "`article`" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["data", str(f), "--ignore", "article"])
    assert res.exit_code == 0 and "keys ignored (the source's ignore): article" in res.output and "keys not used: id (label)" in res.output


def test_unused_message_list_is_named_not_the_symptom(tmp_path):
    """`context` beside chosen/rejected message lists: the reason is the unread key, not "share no prompt messages"."""
    rows = [{"context": [{"from": "human", "content": f"Question {i}?"}], "chosen": [bot(f"Answer {i}.")], "rejected": [bot("No.")]}
            for i in range(3)]
    with pytest.raises(DataError) as e:
        load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert "`context`" in str(e.value) and "message list" in str(e.value) and 'prompt = "context"' in str(e.value)
    assert "share no prompt" not in str(e.value)
    got = pairs(tmp_path, rows, columns={"prompt": "context", "role": "from"})
    assert got[0]["prompt"] == [user("Question 0?")]


def test_a_mapped_key_the_format_does_not_read_is_refused(tmp_path):
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go.", "ctx": "x"}]
    with pytest.raises(DataError, match="columns.history = 'ctx': the hh format does not read history"):
        load(write_jsonl(tmp_path / "d.jsonl", rows), columns={"history": "ctx"})


def _varied(make, n=4):
    return [make(i) for i in range(n)]


# Representative rows of every public layout docs/data-formats.md lists, with their metadata keys as published.
PUBLIC = {
    "UltraFeedback binarized (H4)": (None, _varied(lambda i: {
        "prompt": f"How do I cook dish {i}?", "prompt_id": f"{i:064x}",
        "chosen": [user(f"How do I cook dish {i}?"), bot(f"Heat the pan, then cook dish {i} for ten minutes.")],
        "rejected": [user(f"How do I cook dish {i}?"), bot("Microwave it.")],
        "messages": [user(f"How do I cook dish {i}?"), bot(f"Heat the pan, then cook dish {i} for ten minutes.")],
        "score_chosen": 8.0, "score_rejected": 8.0 if i == 0 else 4.0})),
    "UltraFeedback binarized cleaned (Argilla)": (None, _varied(lambda i: {
        "source": ["evol_instruct", "sharegpt"][i % 2], "prompt": f"Explain idea {i} to me.",
        "chosen": [user(f"Explain idea {i} to me."), bot(f"Idea {i} means this and that.")], "chosen-rating": 5,
        "chosen-model": "gpt-4", "rejected": [user(f"Explain idea {i} to me."), bot("No idea.")], "rejected-rating": 2,
        "rejected-model": "llama-2-7b-chat"})),
    "Anthropic HH": (None, _varied(lambda i: {"chosen": f"\n\nHuman: Hi number {i}\n\nAssistant: Hello there!",
                                             "rejected": f"\n\nHuman: Hi number {i}\n\nAssistant: Go away."})),
    "Orca pairs (Intel)": (None, _varied(lambda i: {"system": "You are a helpful assistant.", "question": f"What is {i} + {i}?",
                                                   "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."})),
    "LLaMA-Factory ShareGPT": (None, _varied(lambda i: {"conversations": [{"from": "human", "value": f"Question {i}?"}],
                                                       "chosen": {"from": "gpt", "value": f"Answer {i}."},
                                                       "rejected": {"from": "gpt", "value": "No."}})),
    "LLaMA-Factory Alpaca": (None, _varied(lambda i: {"instruction": f"Translate sentence {i}.", "input": f"Bonjour {i}.",
                                                     "chosen": f"Hello {i}.", "rejected": "Goodbye."})),
    "LLaMA-Factory messages": (None, _varied(lambda i: {"chosen_messages": [user(f"Q {i}?"), bot(f"A {i}.")],
                                                       "rejected_messages": [user(f"Q {i}?"), bot("No.")]})),
    "AlpacaEval": ("judgment", _varied(lambda i: {
        "instruction": f"Write a poem about topic {i}.", "output_1": f"A poem about topic {i}, in rhyme.", "output_2": "No.",
        "preference": 1.0 + (i % 2), "generator_1": "gpt4_1106_preview", "generator_2": "alpaca-7b", "annotator": "alpaca_eval_gpt4",
        "dataset": "helpful_base", "raw_completion": f"Output (a) is better because it is a poem about topic {i} and rhymes.",
        "price_per_example": 0.01, "time_per_example": 1.5})),
    "LMSYS Arena": ("judgment", _varied(lambda i: {
        "id": 1000 + i, "model_a": "gpt-4", "model_b": "vicuna-13b", "prompt": json.dumps([f"What is the capital of country {i}?"]),
        "response_a": json.dumps([f"The capital of country {i} is city {i}."]), "response_b": json.dumps(["I do not know."]),
        "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0})),
    "Chatbot Arena conversations": ("judgment", _varied(lambda i: {
        "question_id": f"{i:032x}", "model_a": "gpt-4", "model_b": "koala-13b", "winner": "model_a", "judge": f"arena_user_{i}",
        "conversation_a": [user(f"Tell me about planet {i}."), bot(f"Planet {i} is large and far away.")],
        "conversation_b": [user(f"Tell me about planet {i}."), bot("No.")], "turn": 1, "anony": True, "language": "English",
        "tstamp": 1682351591.1 + i, "openai_moderation": {"flagged": False}, "toxic_chat_tag": {"roberta-large": {"flagged": False}}})),
    "OpenAssistant trees": ("ranking", _varied(lambda i: {
        "message_tree_id": f"tree-{i}", "tree_state": "ready_for_export",
        "prompt": {"message_id": f"m{i}", "text": f"How do plants grow, question {i}?", "role": "prompter", "lang": "en",
                   "replies": [{"message_id": f"a{i}", "text": f"With light and water, answer {i}.", "role": "assistant", "rank": 0},
                               {"message_id": f"b{i}", "text": "Magic.", "role": "assistant", "rank": 1}]}})),
    "OpenAssistant messages": ("ranking", [
        {"message_id": "p", "parent_id": None, "user_id": "u1", "created_date": "2023-02-05T14:23:50+00:00",
         "text": "How do plants grow?", "role": "prompter", "lang": "en", "review_count": 3, "review_result": True,
         "deleted": False, "rank": None, "synthetic": False, "model_name": None, "detoxify": {"toxicity": 0.01},
         "message_tree_id": "p", "tree_state": "ready_for_export", "emojis": {"name": ["+1"], "count": [2]},
         "labels": {"name": ["spam"], "value": [0.0], "count": [3]}},
        *({"message_id": m, "parent_id": "p", "user_id": f"u{k}", "created_date": "2023-02-05T15:00:00+00:00", "text": t,
           "role": "assistant", "lang": "en", "review_count": 3, "review_result": True, "deleted": False, "rank": k,
           "synthetic": False, "model_name": None, "detoxify": None, "message_tree_id": "p", "tree_state": "ready_for_export",
           "emojis": None, "labels": None} for k, (m, t) in enumerate([("a", "With light and water."), ("b", "Magic.")]))]),
    "UltraFeedback raw": ("scores", _varied(lambda i: {
        "source": "truthful_qa", "instruction": f"Is claim {i} true?", "models": ["gpt-4", "alpaca-7b"],
        "completions": [{"model": "gpt-4", "response": f"Claim {i} is false, because of evidence.", "overall_score": 8.0,
                         "critique": "Good."},
                        {"model": "alpaca-7b", "response": "Yes.", "overall_score": 3.0, "critique": "Wrong."}],
        "correct_answers": [f"Claim {i} is false according to the record"], "incorrect_answers": [f"Claim {i} is true as everyone knows"]})),
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_layouts_pass_the_row_contract(tmp_path, name):
    rule, rows = PUBLIC[name]
    ps = load(write_jsonl(tmp_path / "d.jsonl", rows), pairs_from=rule)
    rep = ps.reports[0]
    assert ps.rows and not rep.bad, rep.summary()
    keys = {k for r in rows for k in r}
    assert set(rep.keys.used) | set(rep.keys.unused) == keys  # every key accounted for, none refused


def test_shipped_data_passes_the_row_contract():
    for f in (ORCA, ULTRA, ROOT / "data" / "ultrafeedback" / "eval_clean.jsonl"):
        assert load(f).rows
    for recipe in ("quickstart.toml", "two_step.toml"):
        res = CliRunner().invoke(main, ["data", str(ROOT / "recipes" / recipe), "--rows", "0"])
        assert "look like content" not in res.output and "looks like content" not in res.output, res.output


def test_score_ties_and_rule_choices_are_counted(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No.", "score_chosen": 7.0, "score_rejected": 7.0 if i < 2 else 3.0}
            for i in range(4)]
    rep = load(write_jsonl(tmp_path / "d.jsonl", rows)).reports[0]
    assert rep.score_ties == {"score_chosen equals score_rejected": [1, 2]}
    assert "2 pairs kept whose score_chosen equals score_rejected (rows 1, 2" in rep.summary()
    scored = [{"prompt": f"Q{i}?", "completions": [{"text": "best", "score": 9}, {"text": "mid", "score": 5},
                                                   {"text": "low", "score": 1}, {"text": "unscored"}]} for i in range(2)]
    rep = load(write_jsonl(tmp_path / "s.jsonl", scored), pairs_from="scores").reports[0]
    assert rep.notes == {"answers without a numeric `score` or without text left out": [1, 2],
                         "answers between the highest and the lowest score not used": [1, 2]}


def test_kto_messages_with_label_named_as_unpaired(tmp_path):
    rows = [{"messages": [user(f"Q{i}?"), bot(f"A{i}.")], "label": bool(i % 2)} for i in range(3)]
    with pytest.raises(DataError, match="unpaired data"):
        load(write_jsonl(tmp_path / "d.jsonl", rows))


# ----------------------------------------------------------------------------- templated prompts


NEMO = [{"prompt": f"<extra_id_0>System\n\n<extra_id_1>User\nWhat is {i} + {i}?\n<extra_id_1>Assistant\n",
         "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(3)]


def test_templated_prompt_refused_with_the_reason(tmp_path):
    with pytest.raises(DataError) as e:
        load_pairs([SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", NEMO)))], None, max_bad_fraction=0.01)
    assert "<extra_id_1> (NeMo)" in str(e.value) and 'templated = "verbatim"' in str(e.value)


def test_templated_prompt_kept_verbatim_without_a_second_template(tmp_path):
    got = pairs(tmp_path, NEMO, templated="verbatim")
    assert got[1] == {"prompt": NEMO[1]["prompt"], "chosen": "2.", "rejected": "3."}  # TRL's string format: no template
    t = tokenize_pair({**got[1]}, pico_tokenizer())
    assert pico_tokenizer().decode(t["prompt_ids"], skip_special_tokens=False).count("<extra_id_1>") == 2
    assert "<|user|>" not in pico_tokenizer().decode(t["prompt_ids"])


def test_templated_transcripts_without_roles_stay_text(tmp_path):
    """Full string transcripts (implicit prompt) are TRL's string format: no template is applied, nothing is wrapped."""
    rows = [{"chosen": f"<|im_start|>user\nQ{i}?<|im_end|>\n<|im_start|>assistant\nA{i}.<|im_end|>",
             "rejected": f"<|im_start|>user\nQ{i}?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>"} for i in range(2)]
    got = pairs(tmp_path, rows)
    assert got[0] == {"prompt": "<|im_start|>user\nQ0?<|im_end|>\n<|im_start|>assistant\n", "chosen": "A0.<|im_end|>",
                      "rejected": "No.<|im_end|>"}


def test_the_models_own_markers_are_refused(tmp_path):
    rows = [{"prompt": f"<|user|>\nWhat is {i}?<|end|>\n<|assistant|>\n", "chosen": "x", "rejected": "y"} for i in range(2)]
    with pytest.raises(DataError, match="phi-3"):  # a known format's markers: named without the model
        load(write_jsonl(tmp_path / "d.jsonl", rows))
    own = load(write_jsonl(tmp_path / "o.jsonl", [{"prompt": "Hi <|placeholder1|> there", "chosen": "x", "rejected": "y"}]))
    tok = copy.deepcopy(pico_tokenizer())
    check_with_tokenizer(own, tok)  # not a marker of this template
    tok.chat_template = tok.chat_template.replace("<|system|>", "<|placeholder1|>")  # now the template writes it
    with pytest.raises(DataError, match=r"<\|placeholder1\|> \(this model's template\)"):
        check_with_tokenizer(own, tok)


# ----------------------------------------------------------------------------- no traceback, ever


# Two good rows of every recognised format and pairs_from layout (and the prompt parts).
FORMATS = {
    "openai": (None, [{"input": {"messages": [user(f"Q{i}?")]}, "preferred_output": [bot(f"A{i}.")],
                       "non_preferred_output": [bot("No.")], "tools": TOOLS} for i in range(2)]),
    "sharegpt": (None, [{"conversations": [{"from": "human", "value": f"Q{i}?"}], "chosen": f"A{i}.",
                         "rejected": {"from": "gpt", "value": "No."}, "system": "S."} for i in range(2)]),
    "orca": (None, [{"system": "S.", "question": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No.", "input": "x"} for i in range(2)]),
    "alpaca": (None, [{"instruction": f"Q{i}?", "input": "ctx", "history": [["a", "b"]], "chosen": f"A{i}.", "rejected": "No."}
                      for i in range(2)]),
    "conversational": (None, [{"prompt": [user(f"Q{i}?")], "chosen": [bot(f"A{i}.")], "rejected": [bot("No.")],
                               "history": [user("h"), bot("k")]} for i in range(2)]),
    "ultrafeedback": (None, [{"prompt": f"Q{i}?", "chosen": [user(f"Q{i}?"), bot(f"A{i}.")], "rejected": [user(f"Q{i}?"), bot("No.")]}
                             for i in range(2)]),
    "standard": (None, [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No.", "system": "S."} for i in range(2)]),
    "hh": (None, [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: A{i}.", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: No."} for i in range(2)]),
    "implicit": (None, [{"chosen": [user(f"Q{i}?"), bot(f"A{i}.")], "rejected": [user(f"Q{i}?"), bot("No.")]} for i in range(2)]),
    "messages": (None, [{"prompt_messages": [user(f"Q{i}?")], "chosen_messages": [bot(f"A{i}.")],
                         "rejected_messages": [bot("No.")]} for i in range(2)]),
    **{f"public: {k}": v for k, v in PUBLIC.items() if v[0]},
    "scores completions": ("scores", [{"prompt": f"Q{i}?", "completions": ["a", "b"], "scores": [1, 2]} for i in range(2)]),
    "scores one answer a row": ("scores", [{"prompt": "Q?", "response": t, "score": s} for t, s in (("a", 1), ("b", 2), ("c", 3))]),
    "ranking completions": ("ranking", [{"prompt": f"Q{i}?", "completions": [{"text": "a", "rank": 0}, {"text": "b", "rank": 1}]}
                                        for i in range(2)]),
    "judgment a/b": ("judgment", [{"prompt": f"Q{i}?", "response_a": "a", "response_b": "b", "preference": 1} for i in range(2)]),
}

FILLERS = [None, "", " ", [], {}, 0, 1.5, True, "text", ["a", "b"], [["q", "a"]], [{"x": 1}], {"role": "user"},
           [{"role": 1, "content": None}], [{"from": "gpt"}], {"messages": "x"}, '["broken', "[1, 2]", float("nan"),
           [[[]]], {"text": "t", "rank": "high"}, "\n\nHuman: x", "<|im_start|>user"]


def _paths(v, path=()):
    yield path
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*path, i))


def _mutate(row, rng: random.Random):
    """One random change: a value replaced (types swapped, empty, nested), a key removed or renamed, a string
    wrapped in a list, a list flattened, a value nested in an object."""
    row = copy.deepcopy(row)
    paths = [p for p in _paths(row) if p]
    if not paths:
        return rng.choice(FILLERS)
    path = rng.choice(paths)
    parent = row
    for k in path[:-1]:
        parent = parent[k]
    k = path[-1]
    v = parent[k]
    how = rng.randrange(6)
    if how == 0 and isinstance(parent, dict):
        del parent[k]
    elif how == 0:
        parent.pop(k)
    elif how == 1:
        parent[k] = [v]
    elif how == 2:
        parent[k] = {"value": v}
    elif how == 3 and isinstance(v, (list, dict)) and v:
        parent[k] = next(iter(v.values())) if isinstance(v, dict) else v[0]
    elif how == 4 and isinstance(parent, dict):
        parent[f"{k}_x"] = parent.pop(k)
    else:
        parent[k] = rng.choice(FILLERS)
    return row


CASES_PER_FORMAT = 12


def _cases():
    rng = random.Random(30)
    for name, (rule, rows) in FORMATS.items():
        for c in range(CASES_PER_FORMAT):
            mutated = copy.deepcopy(rows)
            for _ in range(1 + rng.randrange(3)):
                i = rng.randrange(len(mutated))
                mutated[i] = _mutate(mutated[i], rng)
            yield name, c, rule, mutated


def _accounted(ps, n_rows: int, rule) -> None:
    for rep in ps.reports:
        if rule is None:  # one pair or one named bad row per row
            assert rep.used + len(rep.bad) + len(rep.duplicates) == rep.total == n_rows, rep.summary()
        assert all(isinstance(why, str) and why for _, why in rep.bad)


def test_mutated_rows_of_every_format_give_a_pair_a_bad_row_or_a_data_error(tmp_path, monkeypatch):
    """Seeded (random.Random(30)): 12 mutations of every format (288 files), each through load_pairs and `data
    --json`, every third also through `plan` (the tokenizer, no model: ~0.04 s a call). Every outcome is a pair, a
    named bad row or a DataError (exit 2, one message); never another exception. About 7 s."""
    import lora_sdpo.plan as plan_mod

    monkeypatch.setattr(plan_mod, "load_tokenizer", lambda *a, **k: pico_tokenizer())  # once, not per case
    runner = CliRunner()
    outcomes = {"pairs": 0, "DataError": 0}
    for name, c, rule, rows in _cases():
        f = tmp_path / f"{abs(hash(name))}-{c}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        where = f"{name} case {c}: {json.dumps(rows)[:300]}"
        try:
            ps = load_pairs([SourceConfig(path=str(f), pairs_from=rule)], None, max_bad_fraction=1.0)
        except DataError:
            outcomes["DataError"] += 1
        except Exception as e:  # noqa: BLE001: the point of the test
            raise AssertionError(f"{type(e).__name__}: {e} -- {where}") from e
        else:
            outcomes["pairs"] += 1
            _accounted(ps, len(rows), rule)
        args = ["data", str(f), "--json"] + (["--pairs-from", rule] if rule else [])
        res = runner.invoke(main, args)
        assert res.exit_code in (0, 2) and (res.exception is None or isinstance(res.exception, SystemExit)), (where, res.output)
        if c % 3:
            continue
        recipe = f.with_suffix(".toml")
        recipe.write_text(recipe_toml(f, settings=SHORT_SETTINGS.replace("[training]", '[data]\nmax_bad_fraction = 1.0\n[training]'),
                                      last_source=f'pairs_from = "{rule}"' if rule else ""))
        res = runner.invoke(main, ["plan", str(recipe)])
        assert res.exit_code in (0, 2) and (res.exception is None or isinstance(res.exception, SystemExit)), (where, res.output)
        assert "Traceback" not in res.output
    assert outcomes["pairs"] and outcomes["DataError"]  # both outcomes occur: the mutations reach the checks


def test_mutated_csv_text_gives_pairs_bad_rows_or_a_data_error(tmp_path):
    """Seeded: 60 CSV/TSV files with separators, quotes, brackets and line breaks inserted at random places. Every
    row is a pair or a named bad row, or the file is refused with a DataError naming it; never another exception."""
    rng = random.Random(32)
    good = "prompt,chosen,rejected\n" + "".join(f"Question {i}?,Answer {i}.,Wrong {i}.\n" for i in range(5))
    for c in range(60):
        sep = "\t" if c % 2 else ","
        text = list(good.replace(",", sep))
        for _ in range(1 + rng.randrange(3)):
            text.insert(rng.randrange(len(text)), rng.choice([sep, '"', "\n", "[", '{"', '["', "\x00", "\r"]))
        f = tmp_path / f"m{c}{'.tsv' if c % 2 else '.csv'}"
        f.write_text("".join(text))
        try:
            ps = load(f)
        except DataError as e:
            assert str(f) in str(e)
            continue
        rep = ps.reports[0]
        assert rep.used + len(rep.bad) + len(rep.duplicates) == rep.total
        assert all(isinstance(why, str) and why for _, why in rep.bad)
