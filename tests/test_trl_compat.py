"""TRL's touch-points (lora_sdpo/trl_compat.py): every name below TRL's public API that lora-sdpo
uses is listed there and present in the installed TRL, a missing or changed one is caught, and no
other module of the package reaches below TRL's public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lora_sdpo import trl_compat

PACKAGE = Path(__file__).resolve().parent.parent / "lora_sdpo"


def test_every_touch_point_is_in_the_installed_trl():
    assert trl_compat.missing() == []
    listed = {f"{t.module}.{t.name}" for t in trl_compat.TOUCH_POINTS}
    assert {
        "trl.kernels.chunked_logprob._use_triton", "trl.data_utils._tokenize", "trl.trainer.dpo_trainer.DPOTrainer._compute_loss",
        "transformers.trainer.Trainer._get_train_sampler", "transformers.trainer.Trainer._load_from_checkpoint",
    } <= listed


def test_a_missing_touch_point_stops_the_import_with_what_to_do(monkeypatch):
    import trl.kernels.chunked_logprob as ck

    monkeypatch.delattr(ck, "_use_triton")
    assert trl_compat.missing() == ["trl.kernels.chunked_logprob._use_triton is gone"]
    with pytest.raises(ImportError, match="_use_triton is gone") as e:
        trl_compat.check()
    assert "written for TRL >=1.16.0,<1.17" in str(e.value) and "pip install" in str(e.value)


def test_a_method_that_no_longer_reads_the_reference_columns_is_caught(monkeypatch):
    from trl.trainer.dpo_trainer import DPOTrainer

    def _compute_loss(self, model, inputs, return_outputs):  # a TRL whose loss computes its own reference
        return model(**inputs)

    monkeypatch.setattr(DPOTrainer, "_compute_loss", _compute_loss)
    (problem,) = trl_compat.missing()
    assert "DPOTrainer._compute_loss no longer reads self.precompute_ref_logps" in problem
    with pytest.raises(ImportError):
        trl_compat.check()


def test_another_trl_release_warns_but_runs():
    with pytest.warns(UserWarning, match=r"written for TRL >=1.16.0,<1.17.*this environment has TRL 1.17.0"):
        trl_compat.check("1.17.0")


def _trl_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trl":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names if a.name.split(".")[0] == "trl")


def test_only_trl_compat_reaches_below_trls_public_api():
    """Outside trl_compat.py, a module imports from TRL only what `trl`, `trl.trainer` or
    `trl.kernels` export, and no underscored name."""
    import trl
    import trl.kernels
    import trl.trainer

    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "trl_compat":
            continue
        for module, names in _trl_imports(path):
            for name in names or [module]:
                exported = any(hasattr(m, name) for m in (trl, trl.trainer, trl.kernels)) or name in ("trl", "trl.trainer", "trl.kernels")
                if name.startswith("_") or not exported:
                    bad.append(f"{path.name}: from {module} import {name}")
    assert bad == []
