"""The CUDA branch of the pair forward's LM head (TRL's Triton `ChunkedLogProbFunction`), run on the
CPU by Triton's interpreter, against full logits and against the CPU branch (pairs.TiledLogProbs).

`TRITON_INTERPRET=1` must be set before triton is imported, so the check runs in a subprocess
(this file run as a script). The switch that routes CPU tensors into the Triton branch is TRL's
one predicate `trl.kernels.chunked_logprob._use_triton`, set to answer True in that subprocess:
pairs.head_log_probs reads it at call time, and TRL's kernel picks its Triton kernels by it; nothing
of TRL is copied. TRL's torch fallbacks are made to raise there, so a pass proves the Triton kernels
folded every tile. A small model (vocabulary 512, two vocabulary tiles of 256) keeps the
interpreter fast.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e '.[test]')")
def test_triton_head_equals_full_logits_through_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), "check"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 2, proc.stdout


def _check() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import trl.kernels.chunked_logprob as ck
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from lora_sdpo import pairs

    assert ck._TRITON_AVAILABLE, "TRL did not find triton"
    cpu_branch = ck._use_triton

    def refuse(*_, **__):
        raise AssertionError("TRL's torch fallback ran where the Triton kernel should")

    def triton_branch(on: bool) -> None:
        ck._use_triton = (lambda device: True) if on else cpu_branch
        ck._forward_tile, ck._backward_tile = (refuse, refuse) if on else (fallback_fwd, fallback_bwd)

    fallback_fwd, fallback_bwd = ck._forward_tile, ck._backward_tile
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.lm_head.weight.data.mul_(8)  # logits of a trained model's spread, not ~0: the softmax is not flat
    add_fused_lm_head(model, outputs=pairs.HEAD_OUTPUTS)
    pairs.install(model)
    # pairs of very different lengths, one sharing its answers' first tokens, one truncated
    ids = lambda n: torch.randint(1, 512, (n,)).tolist()  # noqa: E731
    rows = [dict(prompt_ids=ids(p), chosen_ids=ids(a), rejected_ids=ids(b)) for p, a, b in ((5, 9, 3), (30, 12, 20), (12, 40, 40), (3, 2, 6))]
    rows[0]["rejected_ids"] = rows[0]["chosen_ids"][:4] + rows[0]["rejected_ids"]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=64)(rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    scored = labels[:, 1:] != -100
    assert pairs.vocab_tile(int(scored.sum()), 512, torch.device("cpu")) == 512
    pairs.TILE_BYTES["cpu"] = int(scored.sum()) * 4 * 300  # 256 columns a tile: the online softmax folds two tiles

    double = LlamaForCausalLM(cfg).double().eval()
    double.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = double(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    truth = torch.log_softmax(logits, -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0] * scored

    # float32: everything within float32 rounding. bf16: the Triton head against float64 full logits
    # carries the bf16 backbone's rounding (measured 1.8e-2 per token at worst); against the CPU head
    # on the same hidden states the values agree to float32 rounding (both fold the same bf16 tiles
    # in float32), the gradients to bf16's 2^-8 (the CPU head rounds its gradient GEMMs' outputs to
    # bf16 where TRL accumulates them in float32; measured 7.5e-3).
    for dtype, tol_truth, tol_cpu, tol_grad in ((torch.float32, 1e-5, 1e-5, 1e-5), (torch.bfloat16, 5e-2, 1e-5, 2e-2)):
        results = {}
        for branch in ("triton", "cpu"):
            triton_branch(branch == "triton")
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)
                (out.log_probs.sum() + 0.1 * out.entropy[scored].sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[branch] = (out, grads)
        triton_branch(False)
        (tri, g_tri), (cpu, g_cpu) = results["triton"], results["cpu"]
        err_truth = float((tri.log_probs.double() - truth).abs().max())
        errs = {k: float((getattr(tri, k) - getattr(cpu, k)).abs().max()) for k in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs")}
        err_cpu = max(errs.values())
        err_grad = max(float((g_tri[n] - g).norm() / g.norm()) for n, g in g_cpu.items())
        assert err_truth < tol_truth, (dtype, err_truth)
        assert err_cpu < tol_cpu and err_grad < tol_grad, (dtype, errs, err_grad)
        assert torch.equal(tri.is_top1, cpu.is_top1) and torch.equal(tri.label_mask, cpu.label_mask)
        assert len(g_cpu) == len(list(model.parameters())) and "lm_head.weight" in g_tri
        print(f"ok {dtype}: Triton head vs float64 full logits {err_truth:.2e}, vs the CPU head {err_cpu:.2e}, gradients {err_grad:.2e}")


if __name__ == "__main__" and sys.argv[1:] == ["check"]:
    _check()
