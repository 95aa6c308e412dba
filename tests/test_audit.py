"""What each reference has seen: overlaps across steps and with the held-out set, found by hashing
normalised pairs whatever format they came in; and a local model path that is not there."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from conftest import MODEL, SHORT_SETTINGS, recipe_toml, write_jsonl
from lora_sdpo.audit import audit, pair_keys
from lora_sdpo.cli import main
from lora_sdpo.data import normalise
from lora_sdpo.manifest import Manifest



def orca(i: int) -> dict:
    return {"system": "", "question": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}


def standard(i: int) -> dict:
    """orca(i) as TRL's standard format writes it, with other whitespace."""
    return {"prompt": f"  What is {i} +  {i}?\n", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}. "}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def recipe(tmp_path, d1_rows, d2_rows, eval_rows=None, extra=""):
    d1, d2 = write_jsonl(tmp_path / "d1.jsonl", d1_rows), write_jsonl(tmp_path / "d2.jsonl", d2_rows)
    if eval_rows is not None:
        ev = write_jsonl(tmp_path / "ev.jsonl", eval_rows)
        extra += f'\n[[data.eval]]\npath = "{ev}"\n'
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(d1, d2, settings=SHORT_SETTINGS, extra=extra))
    return path


def test_same_pair_in_two_formats_is_one_pair():
    conv = {"prompt": [{"role": "user", "content": "What is 3 + 3?"}], "chosen": [{"role": "assistant", "content": "6."}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "7."}]}]}
    sharegpt = {"conversations": [{"from": "human", "value": "What is 3 +\n3?"}], "chosen": {"from": "gpt", "value": "6."},
                "rejected": {"from": "gpt", "value": "7."}}
    keys = {pair_keys(normalise(r)[1]) for r in (orca(3), standard(3), conv, sharegpt)}
    assert len(keys) == 1
    other = pair_keys(normalise({**orca(3), "rejected": "8."})[1])
    assert other[1] in {k[1] for k in keys} and other[0] not in {k[0] for k in keys}  # same prompt, other pair


def test_overlap_with_eval_refused_listing_the_row(tmp_path):
    r = recipe(tmp_path, [orca(i) for i in range(4)], [orca(i) for i in range(10, 14)], eval_rows=[standard(20), standard(2)])
    out = tmp_path / "out"
    for args in (["plan", str(r)], ["run", str(r), "--output", str(out)]):
        res = invoke(*args)
        assert res.exit_code == 2 and res.output.count("error: ") == 1 and "Traceback" not in res.output, res.output
        assert "held-out data ([[data.eval]]) overlaps the training steps: 1 pair of eval also in D_1" in res.output
        assert f"{tmp_path / 'ev.jsonl'} row 2 = {tmp_path / 'd1.jsonl'} row 3" in res.output
        assert "data.allow_eval_overlap" in res.output
    assert not out.exists()


def test_accepted_eval_overlap_is_marked_contaminated(tmp_path):
    from lora_sdpo.report import matrix_table

    r = recipe(tmp_path, [orca(i) for i in range(4)], [orca(i) for i in range(10, 14)], eval_rows=[standard(20), standard(2)],
               extra="[data]\nallow_eval_overlap = true")
    res = invoke("plan", str(r))
    assert res.exit_code == 0, res.output
    assert "held-out overlap accepted (data.allow_eval_overlap = true): 1 pair of eval also in D_1" in res.output
    found = audit([[normalise(orca(i))[1] | {"source": "d1", "row": i + 1} for i in range(4)]],
                  [normalise(standard(2))[1] | {"source": "ev", "row": 1}], allow_eval_overlap=True)
    found.check()  # accepted: no error
    m = Manifest.model_validate({"status": "done", "recipe_sha256": "0" * 64, "steps": [], "overlap": found.to_dict(),
                                 "gamma_matrix": {"sample": {"D_1": 4, "eval": 1}, "rows": {"S": {}}}})
    assert matrix_table(m)[0] == ["model", "D_1 (n=4)", "eval (n=1, CONTAMINATED)"]


def test_overlap_between_steps_is_a_warning_with_counts(tmp_path):
    d1 = [orca(i) for i in range(6)]
    d2 = [standard(1), standard(4), {**standard(5), "chosen": "Ten."}, standard(30)]  # 2 same pairs, 1 same prompt
    res = invoke("plan", str(recipe(tmp_path, d1, d2)))
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("warning: data overlap"))
    assert "2 pairs of D_2 also in D_1" in line and "1 pair of D_2 with the prompt of a pair of D_1 but other completions" in line
    assert f"{tmp_path / 'd2.jsonl'} row 1 = {tmp_path / 'd1.jsonl'} row 2" in line
    assert "Step 2's reference M_1 has trained on them" in line


def test_60k_rows_against_60k_rows_in_seconds():
    def rows(tag: str, start: int, n: int) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": f"Question number {i}: what follows {i}?"}],
                 "chosen": [{"role": "assistant", "content": f"{i + 1}, since {i} + 1 = {i + 1}."}],
                 "rejected": [{"role": "assistant", "content": f"{i - 1}."}], "source": tag, "row": k + 1}
                for k, i in enumerate(range(start, start + n))]

    d1, d2 = rows("a", 0, 60_000), rows("b", 59_900, 60_000)  # the last 100 of D_1 are the first 100 of D_2
    d2[5000]["chosen"] = [{"role": "assistant", "content": "another answer"}]
    d2[5000]["prompt"] = d1[10]["prompt"]  # and one shared prompt with other completions
    # CPU seconds of this process: on the shared 2-core machine the wall clock also counts other jobs'
    # time slices (idle, the two agree); 2.1 s CPU here under a load of 6
    t = time.process_time()
    found = audit([d1, d2], None)
    elapsed = time.process_time() - t
    (ov,) = found.overlaps
    assert (len(ov.exact), len(ov.prompt)) == (100, 1)
    assert ov.exact[0] == ("b row 1", "a row 59901") and ov.prompt[0] == ("b row 5001", "a row 11")
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.mark.parametrize("command", ["plan", "run", "gamma", "merge"])
def test_missing_local_model_named_as_a_folder(tmp_path, command):
    missing = tmp_path / "nonexistent-model"
    r = recipe(tmp_path, [orca(1)], [orca(2)]).read_text().replace(str(MODEL), str(missing))
    (tmp_path / "r.toml").write_text(r)
    (tmp_path / "adapter").mkdir()
    args = {
        "plan": ["plan", str(tmp_path / "r.toml")],
        "run": ["run", str(tmp_path / "r.toml"), "--output", str(tmp_path / "out")],
        "gamma": ["gamma", "--model", str(missing), "--data", str(tmp_path / "d1.jsonl")],
        "merge": ["merge", str(missing), str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")],
    }[command]
    res = invoke(*args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"no model folder at {missing}" in res.output and "NOT REACHABLE" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_model_path_relative_to_the_recipe_or_a_file(tmp_path):
    r = recipe(tmp_path, [orca(1)], [orca(2)])
    r.write_text(r.read_text().replace(f'path = "{MODEL}"', 'path = "./models/pico"'))
    res = invoke("plan", str(r))
    assert res.exit_code == 2 and f"model.path: no model folder at {tmp_path / 'models' / 'pico'}" in res.output, res.output
    weights = next(MODEL.glob("*.safetensors"))
    res = invoke("gamma", "--model", str(weights), "--data", str(tmp_path / "d1.jsonl"))
    assert res.exit_code == 2 and f"no model folder at {weights}: it is a file" in res.output, res.output
