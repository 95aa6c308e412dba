"""Public preference data in the shapes people bring it (issue 20): HH transcripts, other key names and role
names, pairs derived from scores, rankings and judgments, JSON cells, saved datasets, and the messages
for files that are not what their name says. Each fixture is a few rows written here; each test names
the exact pairs or the exact message."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest
from click.testing import CliRunner

from conftest import recipe_toml, write_jsonl
from lora_sdpo.cli import main
from lora_sdpo.data import DataError, load_pairs, normalise
from lora_sdpo.recipe import SourceConfig


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def P(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": [a(chosen)], "rejected": [a(rejected)]}


def load(path, **kw):
    ps = load_pairs([SourceConfig(path=str(path), **kw)], None, max_bad_fraction=1.0)
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ps.rows], ps.reports[0]


def refused(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_pairs([SourceConfig(path=str(path), **kw)], None, max_bad_fraction=1.0)
    return str(e.value)


# ----------------------------------------------------------------------------- HH transcripts


def test_hh_answers_sharing_their_first_characters_split_at_the_last_assistant_turn(tmp_path):
    """TRL's character prefix would give a prompt ending in "Assistant: D" and answers "uckduckgo" / "DG, ..."."""
    rows = [
        {"chosen": "\n\nHuman: Which search engine is private?\n\nAssistant: Duckduckgo is one.",
         "rejected": "\n\nHuman: Which search engine is private?\n\nAssistant: DDG, short for DuckDuckGo."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Fine? No."},
        {"chosen": "Human: no leading newlines\n\nAssistant: Yes", "rejected": "Human: no leading newlines\n\nAssistant: No"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: And?\n\nAssistant: Ok.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: And?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": ""},
    ]
    pairs, rep = load(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert pairs == [
        P([u("Which search engine is private?")], "Duckduckgo is one.", "DDG, short for DuckDuckGo."),
        P([u("Hi"), a("Hello"), u("How are you?")], "Fine, thanks.", "Fine? No."),
        P([u("no leading newlines")], "Yes", "No"),
    ]
    assert rep.formats == {"hh": 6}
    assert rep.bad == [(4, "chosen and rejected differ before their last Assistant turn (turn 2 of 3): they answer different dialogues"),
                       (5, "`chosen` ends with a Human turn, not an Assistant answer"),
                       (6, "`rejected` has no Human:/Assistant: turns (the other side of the row has)")]


def test_string_split_inside_a_word_or_line_is_warned(tmp_path):
    rows = [{"chosen": "Q: 2+2?\nA: The answer is 4", "rejected": "Q: 2+2?\nA: The answer is 5"},
            {"chosen": "Q: Hi\nA: Hello", "rejected": "Q: Hi\nA: Go away"},
            {"chosen": "Q: name?\nA: Duck", "rejected": "Q: name?\nA: Dog"}]
    pairs, rep = load(write_jsonl(tmp_path / "t.jsonl", rows))
    assert pairs[1] == {"prompt": "Q: Hi\nA:", "chosen": " Hello", "rejected": " Go away"}
    assert rep.inside == [1, 3]
    assert "warning: in 2 pairs the prompt/answer split falls inside a word or line (rows 1, 3)" in rep.summary()


# ----------------------------------------------------------------------------- columns and roles


@pytest.mark.parametrize("row,columns", [
    ({"context": "Q?", "answer_w": "good", "answer_l": "bad", "id": 7}, {"prompt": "context", "chosen": "answer_w", "rejected": "answer_l"}),
    ({"question": "Q?", "response_j": "good", "response_k": "bad"}, {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}),
])
def test_column_mapping(tmp_path, row, columns):
    pairs, rep = load(write_jsonl(tmp_path / "d.jsonl", [row]), columns=columns)
    assert pairs == [P([u("Q?")], "good", "bad")] and rep.formats == {"standard": 1}


def test_system_and_message_keys_mapped(tmp_path):
    rows = [{"sys": "Be brief.", "q": "Q?", "w": "good", "l": "bad"}]
    pairs, _ = load(write_jsonl(tmp_path / "d.jsonl", rows), columns={"system": "sys", "prompt": "q", "chosen": "w", "rejected": "l"})
    assert pairs == [P([s("Be brief."), u("Q?")], "good", "bad")]
    rows = [{"prompt": [{"speaker": "human", "text": "Q?"}], "chosen": [{"speaker": "bot", "text": "good"}],
             "rejected": [{"speaker": "bot", "text": "bad"}]}]
    pairs, _ = load(write_jsonl(tmp_path / "m.jsonl", rows), columns={"role": "speaker", "content": "text"})
    assert pairs == [P([u("Q?")], "good", "bad")]


def test_mapped_key_missing_is_named(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"context": "Q?", "answer_w": "good", "answer_l": "bad"}])
    msg = refused(f, columns={"prompt": "context", "chosen": "answer_win", "rejected": "answer_l"})
    assert msg == f"{f}: columns.chosen = 'answer_win', but no row has the key 'answer_win'; row 1 has the keys context, answer_w, answer_l"
    f = write_jsonl(tmp_path / "e.jsonl", [{"context": "Q?", "answer_w": "good", "answer_l": "bad"}, {"context": "Q2?", "answer_w": "x"}])
    pairs, rep = load(f, columns={"prompt": "context", "chosen": "answer_w", "rejected": "answer_l"})
    assert rep.bad == [(2, "missing `answer_l` (columns.rejected)")] and len(pairs) == 1


def test_default_role_table_and_roles_extension(tmp_path):
    rows = [{"prompt": [{"role": "prompter", "content": "Q?"}, {"role": "bot", "content": "A."}, {"role": "Human", "content": "Q2?"}],
             "chosen": [{"role": "gpt", "content": "good"}], "rejected": [{"role": "model", "content": "bad"}]}]
    pairs, _ = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert pairs == [P([u("Q?"), a("A."), u("Q2?")], "good", "bad")]
    rows = [{"prompt": [{"role": "narrator", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
             "chosen": [a("good")], "rejected": [a("bad")]}]
    f = write_jsonl(tmp_path / "n.jsonl", rows * 2)
    assert refused(f) == (f"{f}: no usable pairs: every row is bad for the same reason (2 rows: prompt[0] has the role 'narrator', "
                          "which chat templates do not know; map it with roles = { narrator = \"user\" } (or \"assistant\", "
                          "\"system\") (rows 1, 2)); raising data.max_bad_fraction cannot help")
    pairs, _ = load(f, roles={"narrator": "system"})
    assert pairs[0] == P([s("Be brief."), u("Q?")], "good", "bad")


def test_message_list_prompt_with_string_answers():
    fmt, pair, problem = normalise({"prompt": [u("Hi"), a("Hello"), u("Sum 2+2?")], "chosen": "4", "rejected": "5"})
    assert (fmt, problem) == ("conversational", None)
    assert pair == P([u("Hi"), a("Hello"), u("Sum 2+2?")], "4", "5")


# ----------------------------------------------------------------------------- pairs_from


def test_scores_lowest_random_and_ties(tmp_path):
    rows = [{"prompt": "Q1", "completions": [{"text": "mid", "score": 5}, {"text": "best", "score": 9}, {"text": "worst", "score": 1}]},
            {"prompt": "Q2", "completions": [{"text": "x", "score": 3}, {"text": "y", "score": 3}]},  # a tie
            {"prompt": "Q3", "completions": ["p", "q", "r", "t"], "scores": [2, 8, 1, 4]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs, rep = load(f, pairs_from="scores")
    assert pairs == [P([u("Q1")], "best", "worst"), P([u("Q3")], "q", "r")]
    assert rep.ties == [2] and rep.formats == {"completions (scores)": 2} and "1 ties dropped (rows 2)" in rep.summary()
    picks = [load(f, pairs_from="scores", pick_rejected="random")[0][1]["rejected"][0]["content"] for _ in range(2)]
    expected = random.Random("42/3").choice([("p", 2.0), ("r", 1.0), ("t", 4.0)])[0]  # seeded by run.seed (42) and the row
    assert picks == [expected, expected]


def test_ultrafeedback_completions_follow_the_binarized_release(tmp_path):
    comps = [{"model": m, "response": f"answer {m}", "overall_score": sc, "fine-grained_score": 5 - sc}
             for m, sc in (("m1", 3.0), ("m2", 8.5), ("m3", 6.0), ("m4", 1.5))]
    rows = [{"source": "evol", "instruction": "Write a haiku.", "models": ["m1", "m2", "m3", "m4"], "completions": comps}]
    f = write_jsonl(tmp_path / "uf.jsonl", rows)
    pairs, rep = load(f, pairs_from="scores")
    assert rep.formats == {"ultrafeedback (scores)": 1}
    lower = ["answer m1", "answer m3", "answer m4"]
    assert pairs[0]["prompt"] == [u("Write a haiku.")] and pairs[0]["chosen"] == [a("answer m2")]
    assert pairs[0]["rejected"] == [a(random.Random("42/1").choice(lower))]
    assert load(f, pairs_from="scores", pick_rejected="lowest")[0] == [P([u("Write a haiku.")], "answer m2", "answer m4")]
    assert load(f, pairs_from="scores", pick_rejected="lowest", score_key="fine-grained_score")[0] == [
        P([u("Write a haiku.")], "answer m4", "answer m2")]


def test_ranking_best_worst_and_adjacent(tmp_path):
    rows = [{"prompt": "Q", "completions": [{"text": "second", "rank": 1}, {"text": "first", "rank": 0}, {"text": "third", "rank": 2}]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    assert load(f, pairs_from="ranking")[0] == [P([u("Q")], "first", "third")]
    assert load(f, pairs_from="ranking", ranking_pairs="adjacent")[0] == [P([u("Q")], "first", "second"), P([u("Q")], "second", "third")]


def test_openassistant_tree(tmp_path):
    def m(role, text, rank=None, replies=()):
        return {"message_id": text, "role": role, "text": text, "rank": rank, "lang": "en", "replies": list(replies)}

    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": m("prompter", "Q1", replies=[
        m("assistant", "A-best", 0, [m("prompter", "Q2", replies=[m("assistant", "B-good", 0), m("assistant", "B-bad", 1)])]),
        m("assistant", "A-mid", 1),
        m("assistant", "A-worst", 2),
        m("assistant", "A-unranked"),
    ])}
    pairs, rep = load(write_jsonl(tmp_path / "trees.jsonl", [tree]), pairs_from="ranking")
    assert pairs == [P([u("Q1")], "A-best", "A-worst"), P([u("Q1"), a("A-best"), u("Q2")], "B-good", "B-bad")]
    assert rep.formats == {"oasst-tree (ranking)": 2}


def test_alpaca_eval_judgments_with_ties(tmp_path):
    rows = [{"instruction": "Q1", "output_1": "one", "output_2": "two", "preference": 2, "generator_1": "g1"},
            {"instruction": "Q2", "output_1": "one", "output_2": "two", "preference": 1.0},
            {"instruction": "Q3", "output_1": "one", "output_2": "two", "preference": 1.5},
            {"instruction": "Q4", "output_1": "one", "output_2": "two", "preference": None}]
    pairs, rep = load(write_jsonl(tmp_path / "ae.json", rows), pairs_from="judgment")
    assert pairs == [P([u("Q1")], "two", "one"), P([u("Q2")], "one", "two")]
    assert rep.ties == [3] and rep.bad == [(4, "`preference` is None, not 1 or 2")]


def test_lmsys_arena_rows(tmp_path):
    def row(prompt, ra, rb, w):
        return {"id": 1, "model_a": "x", "model_b": "y", "prompt": json.dumps(prompt), "response_a": json.dumps(ra),
                "response_b": json.dumps(rb), "winner_model_a": w[0], "winner_model_b": w[1], "winner_tie": w[2]}

    rows = [row(["Hi?"], ["A says"], ["B says"], (0, 1, 0)),
            row(["Hi?", "More?"], ["same", "A more"], ["same", "B more"], (1, 0, 0)),
            row(["Hi?"], ["A"], ["B"], (0, 0, 1)),
            row(["Hi?", "More?"], ["A1", "A2"], ["B1", "B2"], (1, 0, 0))]
    pairs, rep = load(write_jsonl(tmp_path / "arena.jsonl", rows), pairs_from="judgment")
    assert pairs == [P([u("Hi?")], "B says", "A says"), P([u("Hi?"), a("same"), u("More?")], "A more", "B more")]
    assert rep.ties == [3]
    assert rep.bad == [(4, "response_a and response_b differ before their last turn (turn 1 of 2): the two sides answer different dialogues")]
    # the same rows as the competition's CSV: the cells are JSON lists, read as turns, never as literal text
    import csv

    with (tmp_path / "arena.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert load(tmp_path / "arena.csv", pairs_from="judgment")[0] == pairs


def test_pairs_from_on_rows_that_fit_no_layout(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answers": [{"text": "a", "votes": 1}]}])
    msg = refused(f, pairs_from="scores")
    assert msg.startswith(f"{f}: pairs_from = \"scores\" reads UltraFeedback (instruction, completions with overall_score)")
    assert "row 1 has the keys question, answers. Map the keys with `columns = {...}`" in msg


# ----------------------------------------------------------------------------- JSON cells


def test_json_cells_in_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    header = "prompt,chosen,rejected\n"
    (tmp_path / "d.csv").write_text(header + '"[""Hi"", ""Hello!"", ""Sum 2+2?""]",4,5\n'
                                    '"[{""role"": ""user"", ""content"": ""Q?""}]",good,bad\n'
                                    '"[""broken",4,5\n'
                                    '"[""Q3?""]",[citation] kept as text,b\n')
    pairs, rep = load(tmp_path / "d.csv")
    assert pairs == [P([u("Hi"), a("Hello!"), u("Sum 2+2?")], "4", "5"), P([u("Q?")], "good", "bad"),
                     P([u("Q3?")], "[citation] kept as text", "b")]
    assert rep.bad == [(3, "`prompt` starts like JSON ([\"...) but is not valid JSON (Unterminated string starting at at "
                           "character 1); fix the cell or write it as plain text")]
    (tmp_path / "d.tsv").write_text('prompt\tchosen\trejected\n["Hi", "Hello!", "Sum 2+2?"]\t4\t5\n')
    assert load(tmp_path / "d.tsv")[0] == [P([u("Hi"), a("Hello!"), u("Sum 2+2?")], "4", "5")]
    pq.write_table(pa.table({"prompt": ['["Q?"]'], "chosen": ['[{"role": "assistant", "content": "good"}]'], "rejected": ["bad"]}),
                   tmp_path / "d.parquet")
    assert load(tmp_path / "d.parquet")[0] == [P([u("Q?")], "good", "bad")]


# ----------------------------------------------------------------------------- messages that name the real mistake


def test_compressed_content_under_a_plain_name(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'))
    assert refused(f) == f"{f}: is gzip-compressed data under a plain name; rename it to d.jsonl.gz (lora-sdpo reads compressed files by their name)"
    import bz2
    import lzma

    f.write_bytes(bz2.compress(b"{}"))
    assert "is bzip2-compressed data under a plain name; rename it to d.jsonl.bz2" in refused(f)
    f.write_bytes(lzma.compress(b"{}"))
    assert "is xz-compressed data under a plain name; rename it to d.jsonl.xz" in refused(f)


def test_json_array_under_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2, indent=2))
    assert refused(f) == f"{f}: is one JSON array, not JSON lines (one row per line); name it d.json to read it as a JSON list of rows"


def test_dataset_registry(tmp_path):
    info = {f"ds_{i}": {"file_name": f"ds_{i}.json", "formatting": "sharegpt", "ranking": True,
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}} for i in range(14)}
    f = tmp_path / "dataset_info.json"
    f.write_text(json.dumps(info))
    assert refused(f) == (f"{f}: is a dataset registry (as LLaMA-Factory's dataset_info.json: 14 entries, ds_0, ds_1, ds_2, ds_3, "
                          "ds_4, ds_5, ds_6, ds_7, ds_8, ds_9, ... (14 in all)), not preference data; point `path` at the data file "
                          "an entry names (ds_0.json, ds_1.json, ds_2.json) and map its columns with `columns = {...}`")


@pytest.mark.parametrize("key", ["label", "is_desirable", "is_safe"])
def test_unpaired_data(tmp_path, key):
    f = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": "A", key: True}])
    assert refused(f) == (f"{f}: unpaired data (row 1 has the keys prompt, completion, {key}; `{key}` marks one answer good or bad, "
                          "as KTO reads it): DPO needs a chosen and a rejected answer per prompt; pairs_from = \"scores\" can "
                          "build pairs if the rows have several scored answers per prompt")


def test_unknown_format_lists_at_most_ten_keys(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{f"k{i}": i for i in range(25)}])
    msg = refused(f)
    assert "row 1 has the keys k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, ... (25 keys). lora-sdpo reads:" in msg and "k10" not in msg


def test_rows_that_need_a_rule_say_which(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "output_1": "a", "output_2": "b", "preference": 1}])
    assert refused(f) == (f"{f}: no pairs in the rows yet (row 1 has the keys instruction, output_1, output_2, preference); "
                          "set pairs_from = \"judgment\" to build them (see docs/data-formats.md)")


# ----------------------------------------------------------------------------- saved datasets


def test_save_to_disk_folders(tmp_path):
    import datasets

    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2", "chosen": "yes", "rejected": "no"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(
        str(tmp_path / "dict"))
    assert load(tmp_path / "one")[0] == [P([u("Q1")], "good", "bad"), P([u("Q2")], "yes", "no")]
    assert load(tmp_path / "dict")[0] == [P([u("Q1")], "good", "bad")]
    assert load(tmp_path / "dict", split="test")[0] == [P([u("Q2")], "yes", "no")]
    assert refused(tmp_path / "dict", split="validation") == (
        f"{tmp_path / 'dict'}: holds the splits train, test, not 'validation'; set `split` to one of them")
    (tmp_path / "plain").mkdir()
    assert "is a folder, but not one written by datasets' save_to_disk" in refused(tmp_path / "plain")


# ----------------------------------------------------------------------------- lora-sdpo data


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def test_data_command_text_and_json(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"context": "Q?", "answer_w": "good", "answer_l": "bad"},
                                           {"context": "Q2?", "answer_w": "same", "answer_l": "same"}])
    res = invoke("data", str(f), "--columns", "prompt=context,chosen=answer_w,rejected=answer_l")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        str(f),
        f"  source {f}: 1 pairs used of 2 rows; 1 bad dropped (row 2: chosen == rejected)",
        "  formats: standard (2 rows)",
        "  keys used: context, answer_w, answer_l",
        "  note: 1 of 2 rows are bad: a recipe with data.max_bad_fraction = 0.01 (the default) refuses this source",
        f"pair 1 ({f} row 1)", "  prompt:", "    user: Q?", "  chosen:", "    assistant: good", "  rejected:", "    assistant: bad",
    ]
    res = CliRunner().invoke(main, ["data", str(f), "--columns", "prompt=context,chosen=answer_w,rejected=answer_l", "--json"])
    assert res.exit_code == 0
    assert [json.loads(x) for x in res.stdout.splitlines()] == [
        {"prompt": [u("Q?")], "chosen": [a("good")], "rejected": [a("bad")], "source": str(f), "row": 1}]
    assert "1 pairs used of 2 rows" in res.stderr


def test_data_command_pairs_from_and_bad_options(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "completions": [{"text": "hi", "score": 2}, {"text": "lo", "score": 1}]}])
    res = invoke("data", str(f), "--pairs-from", "scores", "--json")
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["chosen"] == [a("hi")]
    res = invoke("data", str(f), "--columns", "answer=completions")
    assert res.exit_code == 2 and "error: " in res.output and "answer cannot be mapped" in res.output and "Traceback" not in res.output
    res = invoke("data", str(tmp_path / "nope.jsonl"))
    assert res.exit_code == 2 and "nope.jsonl: no such file or folder" in res.output


def test_data_command_on_a_recipe_step(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Q1", "chosen": "a", "rejected": "b"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"q": "Q2", "w": "c", "l": "d"}])
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_toml(one, two, adapter=None, settings="", last_source='columns = {prompt = "q", chosen = "w", rejected = "l"}'))
    res = invoke("data", str(recipe), "--step", "2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.splitlines()[-1]) == {"prompt": [u("Q2")], "chosen": [a("c")], "rejected": [a("d")], "source": str(two), "row": 1}
    assert f"step 2 of {recipe}" in res.output
    res = invoke("data", str(recipe), "--step", "3")
    assert res.exit_code == 2 and "--step 3: the recipe has steps 1 to 2" in res.output


def test_openassistant_flat_messages(tmp_path):
    """OpenAssistant's Hub export: one message a row, the tree through parent_id."""
    def m(mid, parent, role, text, rank=None, **kw):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en", **kw}

    rows = [m("p1", None, "prompter", "Q1"), m("a1", "p1", "assistant", "good", 0), m("a2", "p1", "assistant", "bad", 1),
            m("a3", "p1", "assistant", "gone", 2, deleted=True), m("x1", "missing", "assistant", "orphan", 0),
            m("p2", None, "prompter", "Q2"), m("b1", "p2", "assistant", "yes", 0), m("b2", "p2", "assistant", "no", 1)]
    pairs, rep = load(write_jsonl(tmp_path / "oasst.jsonl", rows), pairs_from="ranking")
    assert pairs == [P([u("Q1")], "good", "bad"), P([u("Q2")], "yes", "no")]
    assert rep.bad == [(5, "its parent message missing is not in the source (or deleted)")]


@pytest.mark.parametrize("extra,needle", [
    ('columns = { answer = "x" }', "columns: answer cannot be mapped; the names are prompt, chosen, rejected"),
    ('roles = { narrator = "god" }', "roles: narrator must map to one of user, assistant, system, tool"),
    ('pick_rejected = "random"', "pick_rejected applies only with pairs_from = 'scores'"),
    ('pairs_from = "votes"', "steps.0.sources.0.pairs_from"),
])
def test_source_keys_validated(tmp_path, extra, needle):
    from lora_sdpo.recipe import RecipeError, load_recipe

    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_toml(f, adapter=None, settings="", last_source=extra))
    with pytest.raises(RecipeError, match=re.escape(needle)):
        load_recipe(recipe)


def test_recipe_source_may_be_a_saved_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "Q", "chosen": "a", "rejected": "b"}]).save_to_disk(str(tmp_path / "saved"))
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_toml("saved", adapter=None, settings=""))
    res = invoke("data", str(recipe), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"prompt": [u("Q")], "chosen": [a("a")], "rejected": [a("b")], "source": "saved", "row": 1}


def test_one_answer_a_row_grouped_by_prompt(tmp_path):
    """HelpSteer's layout (one scored answer a row) and KTO's (one labelled answer a row, score_key = "label")."""
    rows = [{"prompt": "Q1", "response": "meh", "score": 2}, {"prompt": "Q2", "response": "only one", "score": 3},
            {"prompt": "Q1", "response": "great", "score": 4}, {"prompt": "Q1", "response": "bad", "score": 0}]
    pairs, rep = load(write_jsonl(tmp_path / "hs.jsonl", rows), pairs_from="scores")
    assert pairs == [P([u("Q1")], "great", "bad")]
    assert rep.bad == [(2, "fewer than two answers in `completions` with a numeric `score`")]
    kto = [{"prompt": [u("Q1")], "completion": [a("yes")], "label": True}, {"prompt": [u("Q1")], "completion": [a("no")], "label": False},
           {"prompt": [u("Q2")], "completion": [a("ok")], "label": True}]
    f = write_jsonl(tmp_path / "kto.jsonl", kto)
    assert refused(f).endswith("pairs_from = \"scores\" with score_key = \"label\" pairs the answers of each prompt (2 prompts in 3 rows)")
    pairs, rep = load(f, pairs_from="scores", score_key="label")
    assert pairs == [P([u("Q1")], "yes", "no")] and [n for n, _ in rep.bad] == [3]
