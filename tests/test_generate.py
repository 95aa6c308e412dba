"""`lora-sdpo generate` and the report's samples (diagnostics.samples): what the models write."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import CLI_OUTPUTS, FAKE_TOKEN, MODEL
from lora_sdpo.generate import GenerateError, Settings, complete, generate, read_prompts
from lora_sdpo.report import build_report
from lora_sdpo.samples import report_section


def _invoke(*args):
    from click.testing import CliRunner

    from lora_sdpo.cli import main

    res = CliRunner().invoke(main, list(args), env={"HF_TOKEN": FAKE_TOKEN, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    CLI_OUTPUTS.append(res.output)
    return res


def test_run_samples_s_and_every_m_t_into_samples_json_and_report(two_step_run, tmp_path):
    doc = json.loads((two_step_run / "samples.json").read_text())
    assert list(doc["models"]) == ["S", "M_1", "M_2"]
    assert len(doc["prompts"]) == 2 and doc["max_new_tokens"] == 16 and doc["decoding"] == "greedy"
    assert doc["prompts"][0][0]["role"] == "user"  # the held-out pair's prompt messages
    assert all(len(m["completions"]) == 2 and all(isinstance(c, str) for c in m["completions"]) for m in doc["models"].values())
    assert doc["models"]["M_2"]["weights"] == "NF4(M_2), float32 compute"
    manifest = json.loads((two_step_run / "manifest.json").read_text())
    assert all(s["timings"]["samples"] > 0 for s in manifest["steps"])  # what they cost, per step
    report = (two_step_run / "report.md").read_text()
    assert "## Samples: what the models write" in report and "[`samples.json`](samples.json)" in report
    samples = report[report.index("## Samples"):]
    for label in ("S", "M_1", "M_2"):
        assert samples.count(f"| {label} | ") == 2  # one row per prompt
    # The report is rebuilt from the files alone: no model, no adapter, no weights at all.
    bare = tmp_path / "bare"
    shutil.copytree(two_step_run, bare, ignore=shutil.ignore_patterns("model", "adapter", "hf_cache", "*.safetensors"))
    assert not list(bare.rglob("*.safetensors"))
    rebuilt = build_report(bare).read_text()
    section = "\n".join(report_section(two_step_run))
    assert section and section in rebuilt and section in report


def test_samples_are_what_generate_writes(two_step_run):
    """The run's samples of M_2 (NF4, as the run loads it after the merge) equal `generate` on the run's files."""
    doc = json.loads((two_step_run / "samples.json").read_text())
    res = generate(str(two_step_run), doc["prompts"], step="2", adapter=None, precision="nf4", compute_dtype="float32",
                   settings=Settings(max_new_tokens=16), log=lambda m: None)
    assert res == {"M_2": doc["models"]["M_2"]["completions"]}


def test_generate_streams_one_model_and_shows_a_run_side_by_side(two_step_run):
    res = _invoke("generate", str(MODEL), "--prompt", "What is the capital of France?", "--max-new-tokens", "8", "--precision", "fp32")
    assert res.exit_code == 0, res.output
    from lora_sdpo.model import load_base, load_tokenizer
    from lora_sdpo.recipe import AdapterConfig

    expected = complete(load_base(MODEL, AdapterConfig(quantization="none", compute_dtype="float32")), load_tokenizer(MODEL),
                        ["What is the capital of France?"], Settings(max_new_tokens=8))[0]
    assert expected.strip() and expected in res.output  # the streamed text is the completion
    res = _invoke("generate", str(two_step_run), "--step", "all", "--prompt", "Hi", "--max-new-tokens", "4", "--precision", "fp32")
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "S" in line and "M_1" in line and "M_2" in line)
    assert header.index("S") < header.index("M_1") < header.index("M_2")  # one column per model


def test_sampling_is_seeded_and_greedy_is_the_argmax():
    from lora_sdpo.model import load_base, load_tokenizer
    from lora_sdpo.recipe import AdapterConfig

    model, tok = load_base(MODEL, AdapterConfig(quantization="none", compute_dtype="float32")), load_tokenizer(MODEL)
    p = ["Name three colours."]
    a = complete(model, tok, p, Settings(max_new_tokens=6, temperature=1.5, seed=3))
    assert a == complete(model, tok, p, Settings(max_new_tokens=6, temperature=1.5, seed=3))
    # greedy: each new token is the argmax of a plain forward pass over the text so far
    import torch

    from lora_sdpo.generate import prompt_ids

    ids = prompt_ids(tok, p[0], 1000)
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert complete(model, tok, p, Settings(max_new_tokens=6))[0] == tok.decode(ids[-6:], skip_special_tokens=True)


def test_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts((), str(tmp_path / "p.txt")) == ["first", "second"]
    rows = [{"prompt": "a text"}, {"prompt": [{"role": "user", "content": "messages"}]},
            {"question": "orca question", "chosen": "x", "rejected": "y"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(("cli",), str(tmp_path / "p.jsonl")) == ["cli", "a text", [{"role": "user", "content": "messages"}],
                                                              [{"role": "user", "content": "orca question"}]]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(GenerateError, match="bad.jsonl: row 2: no prompt"):
        read_prompts((), str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("args, message", [
    (["generate", str(MODEL)], "no prompt: give --prompt TEXT"),
    (["generate", str(MODEL), "--prompts", "/no/such.txt"], "--prompts /no/such.txt: no such file"),
    (["generate", str(MODEL), "--prompt", "x", "--step", "1"], "--step applies to a run directory"),
    (["generate", "/no/such/model", "--prompt", "x"], "no model folder at /no/such/model"),
])
def test_generate_bad_input(args, message):
    res = _invoke(*args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_generate_bad_step_of_a_run(two_step_run):
    res = _invoke("generate", str(two_step_run), "--prompt", "x", "--step", "5")
    assert res.exit_code == 2 and "--step: step 5" in res.output and "finished: [1, 2]" in res.output, res.output
    res = _invoke("generate", str(two_step_run), "--prompt", "x", "--adapter", str(two_step_run / "step-1" / "adapter"))
    assert res.exit_code == 2 and "--adapter applies to a model" in res.output, res.output
