"""The pair forward's exactness on CUDA: what runs there and nowhere else (skipped without a GPU).

On CUDA the pair forward takes FlexAttention (one call per pack, pairs.FLEX = "auto") and TRL's
Triton log-prob kernel for the LM head. These tests check, on the GPU, in float32 and bf16:
- the pair forward (flex + Triton head) against a full-logit forward: per-pair summed log-probs
  within float32 rounding, and in bf16 no further from a float64 truth than TRL's two-row forward;
- FlexAttention's forward AND backward against the SDPA loop (the DPO loss's LoRA gradients);
- the Triton head against full logits (values and gradients).
bench/gpu_accept.sh runs this file first. `LORA_SDPO_TEST_DEVICE=cpu` runs what the CPU can of it
(a dry run of the test code; flex backward and the Triton head are skipped there).
"""

from __future__ import annotations

import os

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from lora_sdpo import pairs
from test_pairs import batch, dpo_loss, float64_twin, full_logit_logps, fused, nf4_model, rel_p95, with_lora  # noqa: F401

DEVICE = os.environ.get("LORA_SDPO_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_accept.sh)")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
HEAD_VOCAB = 32064  # the phi-3 vocabulary (Mistral's is 32000)


@pytest.fixture(scope="module")
def gpu_batch(batch):
    return {k: v.to(DEVICE) for k, v in batch.items()}


def autocast(dtype):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@pytest.mark.parametrize("name", DTYPES)
def test_pair_forward_on_the_device_against_full_logits(gpu_batch, name):
    """float32: per-pair sums within 1e-5 relative of full logits (as on the CPU); bf16: 95th-percentile
    relative error against float64 at most 1.25x TRL's two-row forward's."""
    dtype = DTYPES[name]
    model = nf4_model(dtype, DEVICE)
    truth = full_logit_logps(float64_twin(model), gpu_batch).sum(1)
    with torch.no_grad(), autocast(dtype):
        ours, trl = (fused(model, gpu_batch, enabled=e).log_probs.double().sum(1) for e in (True, False))
    err = {k: (s - truth).abs() / truth.abs().clamp(min=1) for k, s in (("pairs", ours), ("trl", trl))}
    print(name, {k: rel_p95(v) for k, v in err.items()})
    if dtype == torch.float32:
        assert float(err["pairs"].max()) <= 1e-5, err
    else:
        assert rel_p95(err["pairs"]) <= 1.25 * rel_p95(err["trl"]) and float(err["pairs"].max()) < 1e-2, err


@pytest.mark.parametrize("name", DTYPES)
def test_flex_forward_and_backward_equal_the_sdpa_loop(gpu_batch, name, monkeypatch):
    """The DPO loss's log-probs and LoRA gradients through FlexAttention equal the SDPA loop's:
    float32 within 1e-5 (sums, relative) and 1e-4 (gradients, relative norm); bf16 within 3e-3 and 5e-2:
    two bf16 computations of the same thing, each of which the CPU's bf16 arm measures at 6e-4 (sums,
    at worst) and 2.2e-2 (gradients, the worst tensor) from float64, so their gap is up to about twice that."""
    if DEVICE == "cpu":
        pytest.skip("FlexAttention has no backward on the CPU")
    dtype = DTYPES[name]
    results, real = {}, pairs.flex_pack_attention
    for flex in ("on", "off"):
        monkeypatch.setattr(pairs, "FLEX", flex)
        model = nf4_model(dtype, DEVICE)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        peft = with_lora(model)
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft.enable_input_require_grads()
        peft.train()
        calls = []
        monkeypatch.setattr(pairs, "flex_pack_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        with autocast(dtype):
            out = fused(peft, gpu_batch, True)
            loss = dpo_loss(out.log_probs)
        loss.backward()
        assert bool(calls) == (flex == "on")  # forward and the checkpointed replay went through flex
        results[flex] = (out.log_probs.detach().double().sum(1), {n: p.grad.double() for n, p in peft.named_parameters() if p.requires_grad})
    (s_flex, g_flex), (s_loop, g_loop) = results["on"], results["off"]
    tol_sum, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (3e-3, 5e-2)
    rel = ((s_flex - s_loop).abs() / s_loop.abs().clamp(min=1)).max()
    assert rel < tol_sum, float(rel)
    worst = max(float((g_flex[n] - g).norm() / g.norm()) for n, g in g_loop.items())
    print(name, "sums", float(rel), "gradients", worst)
    assert len(g_loop) == 4 * 7 * 2 and worst < tol_grad, worst


@pytest.mark.parametrize("name", DTYPES)
def test_triton_head_against_full_logits(name):
    """TRL's Triton kernel as pairs.head_log_probs calls it (the pair forward's vocabulary tile, 32,064
    columns, two token chunks): log-probs within 1e-4 (entropy 1e-3) of float64 log_softmax over the
    same logits (bf16: the logits rounded to bf16 as the kernel's tile is, within one bf16 step of the
    largest logit), gradients of hidden and weight within 1e-4 (float32) and 2e-2 (bf16) relative."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, _use_triton

    if not _use_triton(torch.device(DEVICE)):
        pytest.skip("no Triton on this device (tests/test_triton_head.py runs the kernel on the CPU)")
    dtype = DTYPES[name]
    torch.manual_seed(0)
    n, hidden, vocab = TOKEN_CHUNK_SIZE + 100, 256, HEAD_VOCAB
    h = torch.randn(n, hidden, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=DEVICE) * 0.2).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=DEVICE)
    lp, ent, *_ = pairs.head_log_probs(h, w, None, t, object())
    (lp.sum() + 0.1 * ent.sum()).backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = hd @ wd.t()
    tol_value = 1e-4
    if dtype == torch.bfloat16:
        # the bf16 tile's values (the kernel's token chunks, as TRL multiplies them), float64 gradients;
        # cuBLAS may still round a logit to the neighbouring bf16 value: allow one bf16 step of the largest
        tile = torch.cat([h.detach()[s : s + TOKEN_CHUNK_SIZE] @ w.detach().t() for s in range(0, n, TOKEN_CHUNK_SIZE)]).double()
        z = z + (tile - z).detach()
        tol_value = 2**-8 * float(tile.abs().max())
    logp = torch.log_softmax(z, -1)
    ref_lp, ref_ent = logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
    (ref_lp.sum() + 0.1 * ref_ent.sum()).backward()
    assert float((lp.double() - ref_lp).abs().max()) < tol_value and float((ent.double() - ref_ent).abs().max()) < 10 * tol_value
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in ((h.grad, hd.grad), (w.grad, wd.grad)):
        assert float((got.double() - want).norm() / want.norm()) < tol
