"""The gamma matrix with its noise: each cell's standard error and the paper's comparison as a paired
difference, recomputed here by hand from the per-pair gammas the run keeps (gamma/ROW.safetensors)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_sdpo.diagnostics import paired_difference


def test_paired_difference_by_hand():
    d = paired_difference(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 0.0, 4.0, 2.0]))  # 1, 2, -1, 4
    assert d["n"] == 4 and d["mean"] == pytest.approx(1.5) and d["frac_positive"] == 0.75
    assert d["se"] == pytest.approx(math.sqrt((0.25 + 0.25 + 6.25 + 6.25) / 3) / 2)
    with pytest.raises(ValueError):
        paired_difference(torch.ones(3), torch.ones(2))


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def test_cells_and_paired_differences_from_the_per_pair_files(two_step_run):
    m = json.loads((two_step_run / "manifest.json").read_text())
    gm = m["gamma_matrix"]
    per_pair = {row: load_file(two_step_run / "gamma" / f"{row}.safetensors") for row in gm["rows"]}
    # the stored values are real per-pair gammas: M_1's on D_2's sample are what TRL's reference pass of step 2 measured
    k = gm["sample"]["D_2"]
    ref = load_file(two_step_run / "step-2" / "data" / "ref_logps.safetensors")
    assert torch.allclose(per_pair["M_1"]["D_2"], (ref["chosen"] - ref["rejected"])[:k], atol=2e-4)
    for row, tensors in per_pair.items():
        assert set(tensors) == set(gm["sample"])
        for data, g in tensors.items():
            cell, xs = gm["rows"][row][data], g.tolist()
            mean, se = _mean_se(xs)
            assert cell["n"] == len(xs) == gm["sample"][data]
            assert cell["mean"] == pytest.approx(mean, abs=1e-5) and cell["se"] == pytest.approx(se, abs=1e-5)

    d = [a - b for a, b in zip(per_pair["M_1"]["D_2"].tolist(), per_pair["S"]["D_2"].tolist())]
    mean, se = _mean_se(d)
    share = sum(x > 0 for x in d) / len(d)
    step1, step2 = gm["paired"]
    assert step1 == {"step": 1, "reference": "S", "data": "D_1"}  # M_0 = S: nothing to compare
    assert (step2["reference"], step2["data"], step2["n"]) == ("M_1", "D_2", k)
    assert step2["mean"] == pytest.approx(mean, abs=1e-5) and step2["se"] == pytest.approx(se, abs=1e-5)
    assert step2["frac_positive"] == share

    report = (two_step_run / "report.md").read_text()
    assert f"| 2 | M_1 | D_2 | {k} | {mean:.2f} ± {se:.2f} | {share:.2f} |" in report
    s_d2 = gm["rows"]["S"]["D_2"]
    assert f"{s_d2['mean']:.2f} ± {s_d2['se']:.2f}" in report  # a cell of the matrix
    for s in m["steps"]:  # the steps table's gamma_ref says over how many pairs
        se_ref = s["gamma_ref_std"] / math.sqrt(s["rows"])
        assert f"| {s['gamma_ref_mean']:.2f} ± {se_ref:.2f} (n={s['rows']}) |" in report
