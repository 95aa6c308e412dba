"""comparison.md's paired tables, computed from per-pair gammas written here by hand (no model): the
held-out reward accuracy and margin of each arm against S with sdpo minus dpo, and the sdpo arm's
gamma matrix with the dpo arm's model as one more row, each row minus S."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from lora_sdpo.compare import DPO_ROW, cross_matrix, heldout_vs_s, write_comparison_md
from lora_sdpo.diagnostics import gamma_file, save_gammas
from lora_sdpo.manifest import GammaMatrix, Manifest, StepRecord

S = [1.0, -2.0, 3.0, 0.5, -1.0]
SDPO = [2.0, -1.0, 2.0, 1.5, 0.0]   # margins vs S: 1, 1, -1, 1, 1
DPO = [1.5, -2.5, 3.5, 0.0, -0.5]   # margins vs S: .5, -.5, .5, -.5, .5


def _results():
    arm = {"recipe_sha256": "x", "steps": 1, "pairs": 10, "pref_accuracy_vs_S": 0.6, "eval_gamma_mean": 0.0,
           "final_train_loss": 0.5, "wall_s": 1.0}
    return {"eval_pairs": len(S), "base_eval_gamma_mean": statistics.fmean(S), "base_eval_gammas": S,
            "arms": {"dpo": {**arm, "eval_gammas": DPO}, "sdpo": {**arm, "steps": 2, "eval_gammas": SDPO}}}


def test_heldout_accuracy_and_margin_against_s_paired():
    h = heldout_vs_s(_results())
    assert h["sdpo"]["accuracy"]["mean"] == pytest.approx(0.8) and h["dpo"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert h["sdpo"]["margin"]["mean"] == pytest.approx(0.6) and h["dpo"]["margin"]["mean"] == pytest.approx(0.1)
    d = [a - b for a, b in zip(SDPO, DPO)]
    assert h["sdpo - dpo"]["margin"]["mean"] == pytest.approx(statistics.fmean(d))
    assert h["sdpo - dpo"]["margin"]["se"] == pytest.approx(statistics.stdev(d) / len(d) ** 0.5)
    acc = [1 - 1, 1 - 0, 0 - 1, 1 - 0, 1 - 1]
    assert h["sdpo - dpo"]["accuracy"]["mean"] == pytest.approx(statistics.fmean(acc))
    assert h["sdpo - dpo"]["accuracy"]["se"] == pytest.approx(statistics.stdev(acc) / len(acc) ** 0.5)
    # swapping the arms' gammas swaps the sign: the table is not symmetric by accident
    r = _results()
    r["arms"]["dpo"]["eval_gammas"], r["arms"]["sdpo"]["eval_gammas"] = SDPO, DPO
    assert heldout_vs_s(r)["sdpo - dpo"]["margin"]["mean"] == pytest.approx(-statistics.fmean(d))


def test_cross_matrix_and_comparison_md(tmp_path):
    out = tmp_path / "cmp"
    sdpo = out / "sdpo"
    g = {
        "S": {"D_1": [0.0, 1.0, 2.0], "D_2": [1.0, 1.0, 4.0], "eval": S[:3]},
        "M_1": {"D_1": [1.0, 2.0, 2.5], "D_2": [2.0, 1.5, 5.0], "eval": SDPO[:3]},
        "M_2": {"D_1": [1.5, 2.0, 3.0], "D_2": [3.0, 2.5, 6.0], "eval": SDPO[:3]},
    }
    for label, per in g.items():
        save_gammas(gamma_file(sdpo, label), {k: torch.tensor(v) for k, v in per.items()})
    save_gammas(gamma_file(out, DPO_ROW), {k: torch.tensor(v) for k, v in
                                           {"D_1": [0.5, 1.0, 2.0], "D_2": [1.0, 2.0, 4.0], "eval": DPO[:3]}.items()})
    m = Manifest(format=1, recipe_sha256="x", status="done", steps=[StepRecord(index=1, status="done")],
                 gamma_matrix=GammaMatrix(sample={"D_1": 3, "D_2": 3, "eval": 3},
                                          rows={label: {} for label in g}))
    sdpo.mkdir(parents=True, exist_ok=True)
    (sdpo / "manifest.json").write_text(m.model_dump_json())
    data, cross = cross_matrix(out)
    assert data == ["D_1", "D_2", "eval"] and list(cross["cells"]) == ["S", "M_1", "M_2", "DPO"]
    assert cross["cells"]["DPO"]["D_2"]["mean"] == pytest.approx(7 / 3)
    d = [2.0 - 1.0, 1.5 - 1.0, 5.0 - 4.0]  # M_1 - S on D_2: the paper's gamma_ref(M_1) - gamma_ref(S)
    assert cross["vs_S"]["M_1"]["D_2"]["mean"] == pytest.approx(statistics.fmean(d))
    assert cross["vs_S"]["M_1"]["D_2"]["se"] == pytest.approx(statistics.stdev(d) / 3 ** 0.5)
    assert "S" not in cross["vs_S"]
    write_comparison_md(_results(), out / "comparison.md", out)
    md = (out / "comparison.md").read_text()

    def pm(xs, digits=2):
        return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.{digits}f}"

    assert f"| M_1 | {pm(g['M_1']['D_1'])} | {pm(g['M_1']['D_2'])} | {pm(g['M_1']['eval'])} |" in md
    margin = [a - b for a, b in zip(SDPO, DPO)]
    assert f"| sdpo - dpo | 5 | {pm([0, 1, -1, 1, 0], 3)} | {pm(margin)} |" in md
    d1 = [a - b for a, b in zip(g["M_1"]["D_1"], g["S"]["D_1"])]
    assert f"| M_1 | {pm(d1)} | {pm(d)} |" in md  # M_1 - S on D_1 and D_2
    json.dumps(_results())  # what comparison.json holds stays JSON
