"""gamma, the gamma matrix and the report: the computation is checked, never the outcome."""

from __future__ import annotations

import glob
import json

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import MODEL, cli_here, completion_logp, nf4
from lora_sdpo.data import normalise
from lora_sdpo.data import tokenize_pair
from lora_sdpo.diagnostics import seen_data_warning


def test_tokenize_pair_is_trls_tokenisation(two_step_run):
    """lora-sdpo's own gamma passes see exactly the token ids TRL trained on."""
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    rows = [json.loads(x) for x in (two_step_run / "step-1" / "data" / "pairs.jsonl").read_text().splitlines()]
    caches = [Dataset.from_file(f) for f in glob.glob(str(two_step_run / "step-1" / "data" / "hf_cache" / "**" / "cache-*.arrow"), recursive=True)]
    trl = next(ds for ds in caches if "prompt_ids" in ds.column_names)
    assert len(trl) == len(rows)
    for i, r in enumerate(rows):
        assert tokenize_pair(r, tok) == {k: trl[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def test_gamma_command_equals_independent_computation(data_dir):
    proc = cli_here("gamma", "--model", str(MODEL), "--data", str(data_dir / "ultra.jsonl"), "--limit", "4", "--max-length", "128", "--json")
    res = json.loads(proc.stdout)
    (entry,) = res["sources"].values()
    assert entry["n"] == 4
    model, tok = nf4(MODEL), AutoTokenizer.from_pretrained(str(MODEL))
    rows = [json.loads(x) for x in (data_dir / "ultra.jsonl").read_text().splitlines()][:4]
    gs = []
    for r in rows:
        _, pair, _ = normalise(r)
        gs.append(completion_logp(model, tok, pair["prompt"], pair["chosen"], 128) - completion_logp(model, tok, pair["prompt"], pair["rejected"], 128))
    g = torch.tensor(gs)
    # gamma is a difference of two summed log-probs, each within 1e-4 of full-logit fp32 (fused,
    # chunked LM head vs log_softmax over all logits), so gamma agrees within 2e-4
    assert abs(entry["mean"] - float(g.mean())) < 2e-4
    assert abs(entry["median"] - float(g.sort().values[1:3].mean())) < 2e-4  # n = 4: mean of the middle two
    assert abs(entry["frac_positive"] - float((g > 0).float().mean())) < 1e-9


def test_gamma_against_reports_the_implicit_reward_view(two_step_run, data_dir):
    proc = cli_here("gamma", "--model", str(two_step_run / "step-1" / "model"), "--against", str(MODEL),
               "--data", str(data_dir / "orca.jsonl"), "--limit", "4", "--max-length", "128")
    assert "gamma_model > gamma_against on" in proc.stdout and "gamma mean" in proc.stdout


def test_seen_data_warning():
    base = torch.tensor([-10.0, -5.0, 0.0, 5.0])  # spread ~6.5
    assert seen_data_warning(base + 1.0, base) is None
    assert "probably been trained on this data" in seen_data_warning(base + 20.0, base)


def test_gamma_matrix_agrees_with_the_reference_passes(two_step_run):
    """Row S on D_1 and row M_1 on D_2 are recomputed by lora-sdpo; TRL's reference passes measured the same."""
    m = json.loads((two_step_run / "manifest.json").read_text())
    gm = m["gamma_matrix"]
    assert list(gm["rows"]) == ["S", "M_1", "M_2"]
    assert set(gm["sample"]) == {"D_1", "D_2", "eval"}  # the fixture holds out 4 pairs
    for model, step in (("S", 1), ("M_1", 2)):
        k = gm["sample"][f"D_{step}"]
        ref = load_file(two_step_run / f"step-{step}" / "data" / "ref_logps.safetensors")
        expected = float((ref["chosen"][:k] - ref["rejected"][:k]).mean())
        assert abs(gm["rows"][model][f"D_{step}"]["mean"] - expected) < 1e-4


def test_report_is_written_and_rebuilt(two_step_run):
    report = two_step_run / "report.md"
    assert report.exists() and (two_step_run / "curves.png").exists() and (two_step_run / "gamma_matrix.png").exists()
    text = report.read_text()
    assert "| step | reference | pairs |" in text and "mean gamma of each model on each dataset" in text
    report.unlink()
    cli_here("report", str(two_step_run))
    assert report.read_text() == text
