"""Bad input, through the CLI: one clear message naming the file, key or row, exit 2, no traceback,
nothing written. Each case is a recipe or data file a user could plausibly bring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import MODEL, SHORT_SETTINGS, recipe_toml, write_jsonl
from lora_sdpo.cli import main

def good_recipe(data, model=MODEL, extra="", **kw) -> str:
    """conftest's recipe over one source, with the tests' length and precision and default settings."""
    return recipe_toml(data, model=model, settings=SHORT_SETTINGS, extra=extra, **kw)


@pytest.fixture(scope="module")
def good_rows() -> list[dict]:
    """Four good rows in the Orca format (system, question, chosen, rejected)."""
    return [{"system": "", "question": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(4)]


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=True)


def assert_refused(result, *needles: str, output: Path | None = None):
    text = result.output  # stdout and stderr, as the user sees them
    assert result.exit_code == 2, (result.exit_code, text, result.exc_info)
    assert "Traceback" not in text
    assert text.count("error: ") == 1, text
    for n in needles:
        assert n in text, (n, text)
    if output is not None:
        assert not output.exists(), f"{output} was written"


def run_with(tmp_path: Path, rows=None, extra: str = "", data_text: str | None = None, name="d.jsonl", recipe_text=None):
    data = tmp_path / name
    if data_text is not None:
        data.write_text(data_text)
    elif rows is not None:
        write_jsonl(data, rows)
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text or good_recipe(data, extra=extra))
    out = tmp_path / "out"
    return invoke(["run", str(recipe), "--output", str(out)]), data, out


# ----------------------------------------------------------------------------- recipes

RECIPE_CASES = {
    "unknown key": ("[training]\nbetta = 0.1", ["training.betta", "unknown key"]),
    "wrong type": ('[training]\nlearning_rate = "fast"', ["training.learning_rate"]),
    "beta zero": ("[training]\nbeta = 0", ["training.beta", "greater than 0"]),
    "beta negative": ("[training]\nbeta = -0.1", ["training.beta", "greater than 0"]),
    "fractions do not sum to 1": ('[data]\nsplit = "stratified"\nfractions = [0.7]', ["fractions sum to 0.7", "must sum to 1"]),
    "fp16 with 4-bit": ('[run]\nname = "x"\n[training]\nprecision = "fp16"', ["training.precision", "fp16 is not offered"]),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_keys(tmp_path, good_rows, case):
    extra, needles = RECIPE_CASES[case]
    # extra tables go after the [training] table of the template, so give them as whole tables
    text = recipe_toml(write_jsonl(tmp_path / "d.jsonl", good_rows), settings="", extra=extra)
    result, _, out = run_with(tmp_path, recipe_text=text)
    assert_refused(result, str(tmp_path / "r.toml"), *needles, output=out)


def test_trust_remote_code_needs_a_pinned_revision(tmp_path, good_rows):
    text = good_recipe(write_jsonl(tmp_path / "d.jsonl", good_rows)).replace(
        "[model]\n", "[model]\ntrust_remote_code = true\n"
    )
    result, _, out = run_with(tmp_path, recipe_text=text)
    assert_refused(result, "model", "trust_remote_code = true needs model.revision", output=out)


@pytest.mark.parametrize("steps", ["steps = []\n", ""], ids=["empty", "missing"])
def test_no_steps(tmp_path, steps):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'{steps}[model]\npath = "{MODEL}"\n')
    result = invoke(["run", str(recipe), "--output", str(tmp_path / "out")])
    assert_refused(result, "steps", output=tmp_path / "out")


def test_step_without_sources(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{MODEL}"\n[[steps]]\nsources = []\n')
    assert_refused(invoke(["run", str(recipe)]), "steps.0.sources", "at least one source")


def test_missing_adapter_preset(tmp_path, good_rows):
    text = good_recipe(write_jsonl(tmp_path / "d.jsonl", good_rows), adapter="qlora-r99")
    result, _, out = run_with(tmp_path, recipe_text=text)
    assert_refused(result, "no preset named 'qlora-r99'", "cpu-qlora-r16", output=out)


def test_output_inside_the_model_folder(tmp_path, good_rows):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    before = sorted(p.name for p in model.iterdir())
    text = good_recipe(write_jsonl(tmp_path / "d.jsonl", good_rows), model=model)
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    for out in (model, model / "run"):
        assert_refused(invoke(["run", str(recipe), "--output", str(out)]), "inside the model folder", "--output")
    assert sorted(p.name for p in model.iterdir()) == before


def test_token_in_a_recipe_or_override_is_refused(tmp_path, good_rows):
    token = "hf_" + "A1b2C3d4" * 5
    text = good_recipe(write_jsonl(tmp_path / "d.jsonl", good_rows)).replace(
        "[model]\n", f'[model]\nrevision = "{token}"\n'
    )
    result, _, out = run_with(tmp_path, recipe_text=text)
    assert_refused(result, "model.revision", "access token", "HF_TOKEN", output=out)
    assert token not in result.output
    result = invoke(["run", str(tmp_path / "r.toml"), "--set", f'run.name="{token}"'])
    assert result.exit_code == 2 and token not in result.output


def test_pickle_weights_refused(tmp_path, good_rows):
    model = tmp_path / "model"
    model.mkdir()
    for f in MODEL.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, model / f.name)
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    text = good_recipe(write_jsonl(tmp_path / "d.jsonl", good_rows), model=model)
    result, _, out = run_with(tmp_path, recipe_text=text)
    assert_refused(result, str(model), "no safetensors weights", "pytorch_model.bin", "pickle", output=out)


# ----------------------------------------------------------------------------- data

U = {"role": "user", "content": "Hi"}


def _bad_rows(good: list[dict], bad: dict, at: int = 2) -> list[dict]:
    rows = [dict(r) for r in good]
    rows.insert(at - 1, bad)
    return rows


DATA_CASES = {
    "missing column": ({"question": "Q?", "chosen": "a"}, "missing `rejected` (the other rows are orca format)"),
    "None field": ({"question": "Q?", "chosen": None, "rejected": "b"}, "`chosen` is missing"),
    "non-string field": ({"question": "Q?", "chosen": "a", "rejected": 5}, "`rejected` is int"),
    "empty completion": ({"question": "Q?", "chosen": "", "rejected": "b"}, "chosen completion is empty"),
    "whitespace completion": ({"question": "Q?", "chosen": "a", "rejected": " \n\t"}, "rejected completion is empty"),
    "chosen == rejected": ({"question": "Q?", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_row_named_with_file_and_row(tmp_path, good_rows, case):
    bad, reason = DATA_CASES[case]
    result, data, out = run_with(tmp_path, _bad_rows(good_rows, bad, at=3))
    assert_refused(result, str(data), "1 of 5 rows are bad", "row 3:", reason, "max_bad_fraction", output=out)


A = {"role": "assistant", "content": "Fine."}
B = {"role": "assistant", "content": "Go away."}
CONV = {"prompt": [U], "chosen": [A], "rejected": [B]}
IMPLICIT_MSGS = {"chosen": [U, A], "rejected": [U, B]}
IMPLICIT_TEXT = {"chosen": "Human: hi\nAssistant: fine", "rejected": "Human: hi\nAssistant: go away"}


@pytest.mark.parametrize(
    "good,bad,reason",
    [
        (CONV, {"prompt": [{"content": "x"}], "chosen": [A], "rejected": [B]}, "prompt[0] has no role/content"),
        (IMPLICIT_MSGS, {"chosen": [U, {"role": "assistant"}], "rejected": [U, B]}, "chosen[0] has no role/content"),
        (IMPLICIT_TEXT, {"chosen": "abc", "rejected": "xyz"}, "no common prompt prefix"),
        (IMPLICIT_TEXT, {"chosen": "Human: hi\nAssistant: hello", "rejected": "Human: hi\nAssistant: hello there"}, "one completion is a prefix of the other"),
        (IMPLICIT_MSGS, {"chosen": [U, A], "rejected": [U]}, "one transcript is a prefix of the other"),
    ],
    ids=["messages without role", "messages without content", "no common prefix", "completion prefix", "transcript prefix"],
)
def test_bad_message_and_implicit_rows(tmp_path, good, bad, reason):
    result, data, out = run_with(tmp_path, [good, bad])
    assert_refused(result, str(data), "row 2:", reason, output=out)


def test_malformed_json_line(tmp_path, good_rows):
    text = "".join(json.dumps(r) + "\n" for r in good_rows[:2]) + '{"question": "Q", "chosen": oops}\n'
    result, data, out = run_with(tmp_path, data_text=text)
    assert_refused(result, f"{data}: line 3 is not valid JSON", output=out)


def test_unreadable_file(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"question": "\xff\xfe"}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(good_recipe(data))
    assert_refused(invoke(["run", str(recipe), "--output", str(tmp_path / "out")]), str(data), "not UTF-8", output=tmp_path / "out")


def test_missing_data_file(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(good_recipe(tmp_path / "nope.jsonl"))
    assert_refused(invoke(["run", str(recipe)]), "steps.0.sources.0.path", "nope.jsonl")


def test_mixed_formats_in_one_source(tmp_path, good_rows):
    rows = good_rows + [{"prompt": "Q?", "chosen": "a", "rejected": "b"}]
    result, data, out = run_with(tmp_path, rows)
    assert_refused(result, str(data), "mixes formats", "orca (4 rows)", "standard (1 rows)", output=out)


def test_step_left_empty(tmp_path):
    rows = [{"question": f"Q{i}", "chosen": "same", "rejected": "same"} for i in range(3)]
    result, data, out = run_with(tmp_path, rows, extra="[data]\nmax_bad_fraction = 1.0")
    assert_refused(result, str(data), "no usable pairs", "3 rows: chosen == rejected (rows 1, 2, 3)", output=out)


def test_prompts_that_fill_max_length(tmp_path, good_rows):
    long_q = {"question": "word " * 400, "chosen": "a", "rejected": "b"}
    result, data, out = run_with(tmp_path, _bad_rows(good_rows, long_q, at=1))
    assert_refused(result, "max_length (128)", f"{data} row 1", "leaving no room for the completion", output=out)


def test_many_bad_rows_are_counted(tmp_path, good_rows):
    bad = [{"question": f"Q{i}", "chosen": "x", "rejected": "x"} for i in range(9)]
    result, data, out = run_with(tmp_path, good_rows + bad)
    assert_refused(result, "9 of 13 rows are bad", "9 rows: chosen == rejected (rows 5, 6, 7, 8, 9, 10, 11, 12, ... 1 more)", output=out)


def test_duplicates_counted_dropped_and_warned(tmp_path, good_rows):
    """Exact duplicates are not an error: they are dropped, counted and reported by plan and run."""
    rows = good_rows + [good_rows[0], good_rows[1], good_rows[0]]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tmp_path / "r.toml"
    recipe.write_text(good_recipe(data))
    result = invoke(["plan", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "4 pairs used of 7 rows" in result.output and "3 exact duplicates dropped (rows 5, 6, 7)" in result.output


def test_unread_content_stops_the_run_before_any_model_loads(tmp_path, good_rows):
    """A key the format does not read that holds free text: named with a sample and both fixes; nothing written."""
    rows = [{**r, "context": f"A passage of text that the question {i} is about, with words."} for i, r in enumerate(good_rows)]
    result, data, out = run_with(tmp_path, rows)
    assert_refused(result, str(data), "`context` (free text; row 1: 'A passage of text", 'columns = { input = "context" }',
                   'ignore = ["context"]', output=out)


def test_ragged_csv_row_is_a_bad_row_through_the_cli(tmp_path):
    text = "question,chosen,rejected\n" + "".join(f"What is {i} + {i}?,{2 * i}.,{2 * i + 1}.\n" for i in range(4))
    text += "What is 9 + 9?,1,8.,19.\n"  # an unquoted comma in the chosen answer
    result, data, out = run_with(tmp_path, data_text=text, name="d.csv")
    assert_refused(result, str(data), "row 5: line 6 has 4 fields for the header's 3 (an unquoted comma in a field?)", output=out)
