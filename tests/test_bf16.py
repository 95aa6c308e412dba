"""The bf16 path end to end: the tests' tiny recipe run with the quickstart's bf16 overrides
(`--set adapter.compute_dtype=bfloat16 --set training.precision=bf16`), NF4 base with bf16 compute.

Kept small because bf16 matmuls are slow on most CPUs: 4 pairs per step (one optimizer update, one
batch), both steps (step 2's reference is M_1 in bf16), retention and the gamma matrix on 4 pairs.
"""

from __future__ import annotations

import json
import math

from transformers import AutoTokenizer
from safetensors.torch import load_file

from conftest import MODEL, ORCA, ULTRA, cli, completion_logp, short_rows, write_jsonl, write_recipe
from test_pairs import float64_twin, nf4_bf16

BF16 = ["--set", "adapter.compute_dtype=bfloat16", "--set", "training.precision=bf16", "--set", "retention.sample_size=4"]


def test_quickstart_overrides_run_in_bf16(tmp_path):
    """First loss of both steps ln 2 within 1e-4: the loss depends only on the gap between the first
    training forward and the cached reference of the same pairs, and with one batch of 4 both run
    the same bf16 kernels on the same pack, so bf16 rounding does not enter the gap (measured: ln 2
    exactly, in float32). Were the passes packed differently, bf16 would allow about
    beta/2 * 2 * 6e-4 * |summed log-probs| (test_pairs' bf16 error), some 0.03 here.
    The cached reference of step 1 is what an independent float64 full-logit forward of the same
    dequantised NF4 weights gives, within bf16's error (2e-3 relative; test_pairs measures 6e-4 at p95)."""
    write_jsonl(tmp_path / "orca.jsonl", short_rows(ORCA, 4))
    write_jsonl(tmp_path / "ultra.jsonl", short_rows(ULTRA, 4))
    run = tmp_path / "run"
    cli("run", str(write_recipe(tmp_path, tmp_path)), "--output", str(run), *BF16)
    m = json.loads((run / "manifest.json").read_text())
    assert m["adapter"]["compute_dtype"] == "bfloat16" and m["adapter"]["r"] == 16  # the preset, one field changed
    assert m["settings"]["recipe"]["training"]["precision"] == "bf16"
    assert [s["status"] for s in m["steps"]] == ["done", "done"]
    for step in m["steps"]:
        first = json.loads((run / f"step-{step['index']}" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-4, (step["index"], first["loss"])
        assert step["first_loss"] == first["loss"]
    # the cached reference of step 1 (S in NF4, bf16 compute) against float64 full logits
    truth_model = float64_twin(nf4_bf16())
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    cache = load_file(run / "step-1" / "data" / "ref_logps.safetensors")
    rows = [json.loads(x) for x in (run / "step-1" / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == len(cache["chosen"]) == 4
    errors = []
    for i, r in enumerate(rows):
        for key in ("chosen", "rejected"):
            truth = completion_logp(truth_model, tok, r["prompt"], r[key], 128)
            errors.append(abs(float(cache[key][i]) - truth) / abs(truth))
    assert max(errors) < 2e-3, errors
    assert max(errors) > 1e-6, errors  # bf16 ran: float32 compute would be within ~1e-7
