"""Data formats people bring, normalised to one pair shape; bad rows named, never silently dropped."""

from __future__ import annotations

import json

import pytest

from conftest import ORCA, ROOT, ULTRA, cli_here, recipe_toml, write_jsonl
from lora_sdpo.data import DataError, load_pairs, normalise, read_file
from lora_sdpo.recipe import SourceConfig, load_recipe

U = {"role": "user", "content": "What is 2+2?"}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}
EXPECTED = {"prompt": [U], "chosen": [A4], "rejected": [A5]}


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "standard"),
        ({"prompt": [U], "chosen": [A4], "rejected": [A5]}, "conversational"),
        ({"prompt": "What is 2+2?", "chosen": [U, A4], "rejected": [U, A5]}, "conversational"),  # UltraFeedback binarized
        ({"chosen": [U, A4], "rejected": [U, A5]}, "implicit"),
        ({"input": {"messages": [U]}, "preferred_output": [A4], "non_preferred_output": [A5]}, "openai"),
        ({"question": "What is 2+2?", "chosen": "4", "rejected": "5"}, "orca"),
        (
            {"conversations": [{"from": "human", "value": "What is 2+2?"}], "chosen": {"from": "gpt", "value": "4"},
             "rejected": {"from": "gpt", "value": "5"}},
            "sharegpt",
        ),
    ],
)
def test_formats_normalise_to_one_shape(row, fmt):
    got_fmt, pair, problem = normalise(row)
    assert (got_fmt, problem) == (fmt, None)
    assert pair == EXPECTED


def test_orca_system_prompt_kept():
    _, pair, _ = normalise({"system": "Be brief.", "question": "Q?", "chosen": "a", "rejected": "b"})
    assert pair["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_implicit_prompt_strings():
    row = {"chosen": "Q: Hi\nA: Hello!", "rejected": "Q: Hi\nA: Go away."}
    fmt, pair, problem = normalise(row)
    assert (fmt, problem) == ("implicit", None) and pair["prompt"] == "Q: Hi\nA:"
    assert pair["chosen"] == " Hello!" and pair["rejected"] == " Go away."


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
        ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "chosen completion is empty"),
        ({"prompt": "p", "chosen": None, "rejected": "b"}, "`chosen` is missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "`chosen` is int"),
        ({"prompt": [{"content": "x"}], "chosen": [A4], "rejected": [A5]}, "prompt[0] has no role/content"),
        ({"text": "hello"}, "unrecognised format"),
        ({"chosen": "abc", "rejected": "xyz"}, "no common prompt prefix"),
    ],
)
def test_bad_rows_have_reasons(row, reason):
    _, pair, problem = normalise(row)
    assert problem is not None and reason in problem


def test_shipped_files_load_with_row_numbers(tmp_path):
    rows = read_file(ORCA)
    assert len(rows) == 284
    rec = load_recipe(ROOT / "recipes" / "quickstart.toml")
    ps = load_pairs([SourceConfig(path=str(ULTRA))], rec, max_bad_fraction=0.01)
    rep = ps.reports[0]
    assert rep.total == 1000
    assert {r for r, _ in rep.bad} >= {307, 656, 911}  # rows whose chosen == rejected
    assert len(ps.rows) == 1000 - len(rep.bad) - len(rep.duplicates)
    assert all(r["row"] not in {b for b, _ in rep.bad} for r in ps.rows)


def test_too_many_bad_rows_refused_with_rows(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 2 + [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    rec = load_recipe(ROOT / "recipes" / "quickstart.toml")
    with pytest.raises(DataError, match=r"2 of 3 rows are bad.*2 rows: chosen == rejected \(rows 1, 2\)"):
        load_pairs([SourceConfig(path=str(f))], rec, max_bad_fraction=0.01)


def test_bad_json_line_named_through_cli(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_toml(f, adapter=None, settings=""))
    proc = cli_here("plan", str(recipe), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{f}: line 2 is not valid JSON" in proc.stderr


def test_limit_and_offset(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    rec = load_recipe(ROOT / "recipes" / "quickstart.toml")
    ps = load_pairs([SourceConfig(path=str(f), offset=3, limit=4)], rec, 0.01)
    assert [r["row"] for r in ps.rows] == [4, 5, 6, 7]
    assert json.dumps(ps.rows[0]["prompt"]) == json.dumps([{"role": "user", "content": "p3"}])
