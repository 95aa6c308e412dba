"""`lora-sdpo eval`: lm-evaluation-harness scores, checked against log-likelihoods computed here.

The task is tests/fixtures/lm_eval_tasks/science_mc.yaml: 20 real multiple-choice questions in
lm-eval's YAML format over a local JSONL file, so everything runs offline. The independent
computation scores each choice as lm-eval's multiple-choice tasks define it: the summed log-prob
of " " + choice after "Question: ...\\nAnswer:" (the continuation's tokens are those of the whole
text after the prompt's), argmax for acc, argmax of log-prob per character for acc_norm.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CLI_OUTPUTS, FAKE_TOKEN, MODEL, nf4

TASKS = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
QUESTIONS = [json.loads(x) for x in (TASKS / "science_mc.jsonl").read_text().splitlines() if x.strip()]


def choice_logps(model, tok, doc: dict) -> list[float]:
    prompt = f"Question: {doc['question']}\nAnswer:"
    ctx = tok.encode(prompt)
    out = []
    for choice in doc["choices"]:
        whole = tok.encode(prompt + " " + choice)
        assert whole[: len(ctx)] == ctx
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        out.append(float(logp[len(ctx) - 1 :].gather(1, ids[0, len(ctx) :, None]).sum()))
    return out


def independent_scores(model, tok, docs=QUESTIONS) -> dict:
    acc = acc_norm = 0
    for doc in docs:
        lps = choice_logps(model, tok, doc)
        acc += max(range(len(lps)), key=lambda i: lps[i]) == doc["answer"]
        norm = [lp / len(c) for lp, c in zip(lps, doc["choices"])]
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == doc["answer"]
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs)}


def _invoke(*args):
    """`lora-sdpo ARGS` in this process (the imports are paid once)."""
    from click.testing import CliRunner

    from lora_sdpo.cli import main

    res = CliRunner().invoke(main, list(args), env={"HF_TOKEN": FAKE_TOKEN, "TQDM_DISABLE": "1"})
    CLI_OUTPUTS.append(res.output)  # test_secrets: the token reaches no output
    return res


def fp32(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_h4_is_the_leaderboard_v1_setup_as_lm_eval_names_it():
    from lora_sdpo.harness import H4, HarnessTask, _indexed, parse_tasks

    assert [(t.name, t.shots, t.metric) for t in H4] == [
        ("arc_challenge", 25, "acc_norm"),
        ("hellaswag", 10, "acc_norm"),
        ("mmlu", 5, "acc"),
        ("truthfulqa_mc2", 0, "acc"),  # lm-eval's truthfulqa_mc2 reports mc2 under "acc"
    ]
    assert [t.macro for t in H4] == [False, False, True, False]  # MMLU: mean of its 57 subjects
    assert parse_tasks("h4,arc_easy:5") == [*H4, HarnessTask("arc_easy", 5, label="arc_easy")]
    # The names and metrics exist in the installed harness (its task index; nothing is downloaded).
    index = _indexed((), True).task_index
    for t in (t for t in H4 if not t.macro):
        assert t.metric in [m["metric"] for m in index[t.name].cfg["metric_list"]], t.name
    assert "mc2" in index["truthfulqa_mc2"].cfg["process_results"]
    subjects = set()
    for sub in index["mmlu"].cfg["task"]:
        for tag in index[sub].cfg["task"]:
            subjects |= index[tag].tags
    assert len(subjects) == 57
    assert all(m["metric"] == "acc" for s in subjects for m in index[s].cfg["metric_list"])


def test_eval_of_a_model_equals_per_choice_loglikelihoods(tmp_path):
    out = tmp_path / "results.json"
    proc = _invoke("eval", str(MODEL), "--include", str(TASKS), "--tasks", "science_mc", "--precision", "nf4",
                   "--compute-dtype", "float32", "--output", str(out))
    assert proc.exit_code == 0, proc.output
    doc = json.loads(out.read_text())
    rec = doc["models"]["pico-llama-phi3"]
    score = rec["scores"]["science_mc"]
    assert (score["metric"], score["shots"], score["samples"], score["limit"]) == ("acc", 0, len(QUESTIONS), None)
    expected = independent_scores(nf4(MODEL), AutoTokenizer.from_pretrained(str(MODEL)))
    assert score["value"] == pytest.approx(expected["acc"], abs=1e-9)
    assert score["metrics"]["acc,none"] == pytest.approx(expected["acc"], abs=1e-9)
    assert score["metrics"]["acc_norm,none"] == pytest.approx(expected["acc_norm"], abs=1e-9)
    p = expected["acc"]
    assert score["stderr"] == pytest.approx((p * (1 - p) / (len(QUESTIONS) - 1)) ** 0.5, rel=1e-6)
    assert rec["precision"] == "nf4, float32 compute" and rec["fingerprint"].startswith("sha256:")
    assert doc["lm_eval"] == rec["lm_eval"] and doc["lm_eval"].count(".") == 2
    assert "science_mc" in proc.output and f"{100 * p:.2f}" in proc.output


def test_eval_of_a_run_scores_s_and_every_m_t_into_manifest_and_report(two_step_run):
    before = json.loads((two_step_run / "manifest.json").read_text())
    res = _invoke("eval", str(two_step_run), "--include", str(TASKS), "--tasks", "science_mc,science_mc_first5:1",
                  "--precision", "fp32", "--limit", "12")
    assert res.exit_code == 0, res.output
    manifest = json.loads((two_step_run / "manifest.json").read_text())
    assert manifest["steps"] == before["steps"]
    models = manifest["eval"]["models"]
    assert list(models) == ["S", "M_1", "M_2"]
    assert len({m["fingerprint"] for m in models.values()}) == 3
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    for label, folder in (("S", MODEL), ("M_1", two_step_run / "step-1" / "model"), ("M_2", two_step_run / "step-2" / "model")):
        s = models[label]["scores"]["science_mc"]
        assert (s["samples"], s["limit"], s["shots"]) == (12, 12, 0)
        assert s["value"] == pytest.approx(independent_scores(fp32(folder), tok, QUESTIONS[:12])["acc"], abs=1e-9), label
        assert models[label]["scores"]["science_mc_first5"]["shots"] == 1
    report = (two_step_run / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert "| model | science_mc | science_mc_first5 |" in table
    for label in ("S", "M_1", "M_2"):
        assert any(line.startswith(f"| {label} | {100 * models[label]['scores']['science_mc']['value']:.2f} ± ") for line in table)
    assert "science_mc: `science_mc` (acc, 0-shot, only 12 of 20 examples (--limit))" in report
    assert "science_mc_first5: `science_mc_first5` (acc, 1-shot)" in report  # 5 examples: the limit cut none
    assert "stale" not in report
    # The fingerprint of a run's M_t can be recomputed from the file hashes its manifest records;
    # a step whose weights changed after its evaluation is marked in the report.
    from lora_sdpo.report import build_report

    step2 = manifest["steps"][1]
    step2["model_files"] = {**step2["model_files"], "model.safetensors": "0" * 64}
    (two_step_run / "manifest.json").write_text(json.dumps(manifest))
    try:
        assert "| M_2 (stale: its weights changed since; evaluate again) |" in build_report(two_step_run).read_text()
    finally:
        (two_step_run / "manifest.json").write_text(json.dumps(before | {"eval": manifest["eval"]}))
        build_report(two_step_run)


def test_a_group_scored_as_the_unweighted_mean_of_its_tasks():
    """How H4 scores MMLU (the leaderboard's mean of subjects), on a local group of two unequal tasks."""
    from lora_sdpo.harness import HarnessTask, Target, evaluate_target, load_tasks, task_manager

    tasks = [HarnessTask("science_group", 0, "acc", macro=True)]
    tm = task_manager(tasks, [str(TASKS)])
    rec = evaluate_target(Target("pico", MODEL), tasks, load_tasks(tm, tasks), tm, limit=None, batch_size="auto", precision="fp32", compute_dtype="float32")
    s = rec["scores"]["science_group"]
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    model = fp32(MODEL)
    full, first5 = independent_scores(model, tok)["acc"], independent_scores(model, tok, QUESTIONS[:5])["acc"]
    assert s["value"] == pytest.approx((full + first5) / 2, abs=1e-9)
    assert s["harness_value"] == pytest.approx((20 * full + 5 * first5) / 25, abs=1e-9)
    assert s["samples"] == 25 and s["aggregate"] == "unweighted mean of 2 tasks"


@pytest.mark.parametrize("args, message", [
    (["eval", "/no/such/model", "--tasks", "science_mc"], "no model folder at /no/such/model"),
    (["eval", str(MODEL), "--tasks", "arc_chalenge"], "unknown lm-eval task arc_chalenge (did you mean arc_challenge"),
    (["eval", str(MODEL), "--tasks", "science_mc", "--include", "/no/such/dir"], "--include /no/such/dir: no such folder"),
    (["eval", str(MODEL), "--tasks", "science_mc:five"], "NAME:SHOTS"),
    (["eval", str(MODEL), "--tasks", "science_group,science_mc", "--include", str(TASKS)],
     "science_group and science_mc both contain the task science_mc"),
    (["eval", str(MODEL), "--steps", "1"], "--steps applies to a run directory"),
])
def test_bad_input_gets_one_message_and_exit_2(args, message):
    res = _invoke(*args)
    assert res.exit_code == 2, res.output
    assert f"error: {message}" in res.output.replace("\n", " ") or message in res.output
    assert "Traceback" not in res.output


def test_without_lm_eval_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    res = _invoke("eval", str(MODEL), "--tasks", "h4")
    assert res.exit_code == 2
    assert "pip install 'lora-sdpo[eval]'" in res.output
