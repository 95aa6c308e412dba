"""The pair forward (lora_sdpo/pairs.py) against TRL's two-row layout and full logits, computed independently."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from conftest import MODEL, ORCA, ULTRA, nf4
from lora_sdpo import pairs
from lora_sdpo.data import normalise, tokenize_pair

MAX_LEN = 160


@pytest.fixture(scope="module")
def batch():
    """Pairs of very different lengths: a prompt that fills most of max_length, truncated completions,
    one whose completions are cut away entirely, and chosen/rejected sharing tokens after the prompt."""
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    rows = []
    for path in (ULTRA, ORCA):
        for line in path.read_text().splitlines()[:8]:
            _, pair, problem = normalise(json.loads(line))
            if problem is None:
                rows.append(tokenize_pair(pair, tok))
    lengths = [len(r["prompt_ids"]) for r in rows]
    long_prompt = next(r for r in rows if MAX_LEN * 0.6 < len(r["prompt_ids"]) < MAX_LEN - 8)
    gone = next(r for r in rows if len(r["prompt_ids"]) >= MAX_LEN)
    short = sorted(rows, key=lambda r: len(r["prompt_ids"]) + len(r["chosen_ids"]))[:3]
    shared = dict(short[0])
    shared["rejected_ids"] = shared["chosen_ids"][:6] + shared["rejected_ids"]  # answers start alike
    prefix = dict(short[1])
    prefix["rejected_ids"] = prefix["chosen_ids"][:4]  # rejected is a prefix of chosen
    picked = [short[2], long_prompt, gone, shared, prefix, rows[0]]
    assert max(lengths) > MAX_LEN and any(len(r["prompt_ids"]) + len(r["chosen_ids"]) > MAX_LEN for r in picked)
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_LEN)
    b = collate([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in picked])
    b["labels"] = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    return b


def full_logit_logps(model, b) -> torch.Tensor:
    """Per-token log-probs of the two-row batch from the model's own logits (no fused head), (2B, L-1)."""
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, b["input_ids"][:, 1:, None])[..., 0]
    return lp * (b["labels"][:, 1:] != -100)


def fused(model, b, enabled: bool):
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(target, "_lora_sdpo_pairs"):
        add_fused_lm_head(target, outputs=pairs.HEAD_OUTPUTS)
    pairs.install(target, enabled=enabled)
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], fused_lm_head=True)


def test_layout_shares_the_common_prefix(batch):
    segs = pairs.pair_segments(batch["input_ids"], batch["attention_mask"])
    lengths = batch["attention_mask"].sum(1)
    half = len(segs)
    for i, (p, a, b) in enumerate(segs):
        assert p + a == lengths[i] and p + b == lengths[half + i]
        c, r = batch["input_ids"][i], batch["input_ids"][half + i]
        assert torch.equal(c[:p], r[:p]) and (p == min(lengths[i], lengths[half + i]) or c[p] != r[p])
    prompt = (batch["completion_mask"][:half] == 0) & (batch["attention_mask"][:half] == 1)
    assert any(p > n for (p, _, _), n in zip(segs, prompt.sum(1)))  # shared beyond the prompt somewhere
    packed = sum(p + a + b for p, a, b in segs)
    assert packed < batch["attention_mask"].sum() < batch["input_ids"].numel()


def test_float64_hidden_states_equal_the_two_row_layout(batch):
    """In float64 a difference would be the layout's, not rounding: every scored position's hidden
    state in the packed rows equals the two-row batch's to 1e-10 (packs split by a small budget too)."""
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float64).eval()
    pairs.install(model)  # registers the attention function and switches the model to it
    with torch.no_grad():
        rows = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        segments = pairs.pair_segments(batch["input_ids"], batch["attention_mask"])
        for budget in (pairs.PACK_TOKENS, 300):
            packs, starts = pairs.pack(batch["input_ids"], segments, budget)
            packed = pairs.backbone_hidden(model, packs)
            mask, idx = pairs.gather_index(batch["labels"], segments, starts)
            expected = rows[:, :-1][mask]
            assert packed.shape[0] == sum(p + a + b for p, a, b in segments) and len(packs) >= (1 if budget > 1000 else 3)
            assert (packed[idx] - expected).abs().max() < 1e-10


@pytest.mark.parametrize("quantised", [False, True], ids=["fp32", "nf4"])
def test_float32_equals_two_row_layout(batch, quantised):
    """Per-pair summed log-probs within 1e-5 (relative to the sum's size, float32 rounding of ~300
    terms); per token, log-probs and TRL's metric fields within 1e-5 of TRL's own fused head."""
    model = nf4(MODEL) if quantised else AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    ref = full_logit_logps(model, batch)
    with torch.no_grad():
        ours = fused(model, batch, enabled=True)
        trl = fused(model, batch, enabled=False)
    s_ref, s_ours = ref.double().sum(1), ours.log_probs.double().sum(1)
    assert ((s_ours - s_ref).abs() <= 1e-5 * s_ref.abs().clamp(min=1)).all(), (s_ours - s_ref).abs().max()
    # per token: TRL's own fused head is 3.2e-5 from the full logits' log_softmax at worst here
    assert (ours.log_probs - ref).abs().max() < 1e-4
    for key in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        assert (getattr(ours, key) - getattr(trl, key)).abs().max() < 1e-5, key
    assert torch.equal(ours.is_top1, trl.is_top1) and torch.equal(ours.label_mask, trl.label_mask)


def test_dpo_loss_gradients_match_through_nf4_lora_and_checkpointing(batch):
    """The DPO loss's gradients w.r.t. every LoRA parameter agree within 1e-4 relative; the pair
    path runs with gradient checkpointing (its layout is replayed in backward)."""
    grads = {}
    for name, enabled in (("pairs", True), ("trl", False)):
        model = nf4(MODEL)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0))
        torch.manual_seed(1)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)  # B = 0 would leave A without gradient
        if enabled:
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft.enable_input_require_grads()
        peft.train()
        out = fused(peft, batch, enabled)
        tally = pairs.tokens_of(model)  # training forwards are counted: which layout ran
        assert (tally["backbone"] < tally["two_row"]) == enabled and tally["two_row"] == batch["input_ids"].numel()
        c, r = out.log_probs.sum(1).chunk(2)
        loss = -torch.nn.functional.logsigmoid(0.1 * ((c - c.detach() - 3.0) - (r - r.detach()))).mean()
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    assert grads["pairs"].keys() == grads["trl"].keys() and len(grads["trl"]) == 4 * 7 * 2
    for n, g in grads["trl"].items():
        assert g.abs().max() > 0, n
        rel = (grads["pairs"][n] - g).norm() / g.norm()
        assert rel < 1e-4, (n, float(rel))


# ---------------------------------------------------------------------------------------------
# bf16 (NF4 base, bfloat16 compute, bf16 autocast: what a GPU recipe runs) against float64 truth


def nf4_model(compute=torch.bfloat16, device="cpu"):
    """The NF4 base as lora-sdpo loads it (model.load_base): matmuls and non-quantised weights in `compute`."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), quantization_config=q, dtype=torch.float32, device_map={"": device}).eval()
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(compute)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def nf4_bf16():
    """compute_dtype = "bfloat16": bf16 matmuls, bf16 non-quantised weights."""
    return nf4_model(torch.bfloat16)


def float64_twin(model):
    """The same weights in float64 on the model's device: each NF4 layer dequantised by bitsandbytes,
    every other tensor as stored."""
    import bitsandbytes as bnb

    twin = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float64).eval()
    src, params = dict(model.named_modules()), dict(model.named_parameters())
    for name, m in twin.named_modules():
        if isinstance(src.get(name), bnb.nn.Linear4bit):
            w = src[name].weight
            m.weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).double().cpu()
    for name, p in twin.named_parameters():
        if name in params and params[name].shape == p.shape:
            p.data = params[name].data.double().cpu()
    return twin.to(next(model.parameters()).device)


def with_lora(model):
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    return peft


def dpo_loss(log_probs):
    c, r = log_probs.sum(1).chunk(2)
    return -torch.nn.functional.logsigmoid(0.1 * ((c - c.detach() - 3.0) - (r - r.detach()))).mean()


def rel_p95(errors) -> float:
    return float(torch.as_tensor(errors, dtype=torch.float64).quantile(0.95))


def test_bf16_log_probs_no_further_from_float64_than_trls(batch):
    """Per-pair summed log-probs in bf16: the pair forward's 95th-percentile relative error against a
    float64 full-logit forward of the same (dequantised NF4) weights is at most 1.25x that of TRL's
    two-row forward in bf16 (measured here: 6.0e-4 vs 6.1e-4; both about bf16's 2^-8 / sqrt(terms))."""
    model = nf4_bf16()
    truth = full_logit_logps(float64_twin(model), batch).sum(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, trl = (fused(model, batch, enabled=e).log_probs.double().sum(1) for e in (True, False))
    err = {k: ((s - truth).abs() / truth.abs().clamp(min=1)) for k, s in (("pairs", ours), ("trl", trl))}
    assert rel_p95(err["pairs"]) <= 1.25 * rel_p95(err["trl"]), {k: rel_p95(v) for k, v in err.items()}
    # bf16, not float32, ran (a float32 head would be ~1e-6 from the truth) and nothing is wildly off
    assert 1e-5 < rel_p95(err["trl"]) < 1e-2 and float(err["pairs"].max()) < 1e-2


def test_bf16_lora_gradients_no_further_from_float64_than_trls(batch):
    """The DPO loss's LoRA gradients in bf16 (the pair path with gradient checkpointing), each tensor's
    relative error against the float64 full-logit gradient: the pair forward's 95th percentile and its
    error over all tensors at most 1.25x TRL's (measured here: 0.019 vs 0.020 and 0.0109 vs 0.0109)."""
    grads = {}
    for name, enabled in (("pairs", True), ("trl", False)):
        model = nf4_bf16()
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        peft = with_lora(model)
        if enabled:
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft.enable_input_require_grads()
        peft.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = dpo_loss(fused(peft, batch, enabled).log_probs)
        loss.backward()
        grads[name] = {n: p.grad.double() for n, p in peft.named_parameters() if p.requires_grad}
        lora = {n: p.data for n, p in peft.named_parameters() if p.requires_grad}
    truth_model = with_lora(float64_twin(model)).train()
    for n, p in truth_model.named_parameters():
        if p.requires_grad:
            p.data = lora[n].double().clone()  # the same LoRA values (float64 init draws other numbers)
    logits = truth_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    dpo_loss(lp * (batch["labels"][:, 1:] != -100)).backward()
    truth = {n: p.grad for n, p in truth_model.named_parameters() if p.requires_grad}
    assert truth.keys() == grads["pairs"].keys() == grads["trl"].keys() and len(truth) == 4 * 7 * 2
    per_tensor = {k: [float((g[n] - t).norm() / t.norm()) for n, t in truth.items()] for k, g in grads.items()}
    flat_t = torch.cat([t.flatten() for t in truth.values()])
    overall = {k: float((torch.cat([g[n].flatten() for n in truth]) - flat_t).norm() / flat_t.norm()) for k, g in grads.items()}
    assert rel_p95(per_tensor["pairs"]) <= 1.25 * rel_p95(per_tensor["trl"]), {k: rel_p95(v) for k, v in per_tensor.items()}
    assert overall["pairs"] <= 1.25 * overall["trl"], overall
    assert overall["trl"] < 0.1  # bf16's rounding, not a wrong gradient


# ---------------------------------------------------------------------------------------------
# FlexAttention: one call per pack with the layout's block mask (the CUDA path), forward-only on the CPU


def test_flex_attention_equals_the_sdpa_loop_without_gradients(batch, monkeypatch):
    """Compiled FlexAttention (dynamic shapes: one graph for every pack length) gives the SDPA loop's
    hidden states within float32 rounding (measured 3e-6), one pack or five; which path runs is
    chosen as documented (the CPU keeps the loop when gradients flow: flex has no CPU backward).
    One compile of flex on the CPU, some 10-40 s here (inductor's cache makes later runs faster)."""
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    pairs.install(model)
    segments = pairs.pair_segments(batch["input_ids"], batch["attention_mask"])
    q = torch.zeros(1, 2, 4, 8)
    monkeypatch.setattr(pairs, "FLEX", "auto")
    assert not pairs.use_flex(q, q, q, 0.0)  # the CPU's default: the SDPA loop
    monkeypatch.setattr(pairs, "FLEX", "on")
    assert pairs.use_flex(q, q, q, 0.0) and not pairs.use_flex(q.requires_grad_(), q, q, 0.0) and not pairs.use_flex(q.detach(), q, q, 0.1)
    calls, flex = [], pairs.flex_pack_attention
    monkeypatch.setattr(pairs, "flex_pack_attention", lambda *a, **k: calls.append(1) or flex(*a, **k))
    with torch.no_grad():
        for budget in (pairs.PACK_TOKENS, 300):
            packs, starts = pairs.pack(batch["input_ids"], segments, budget)
            monkeypatch.setattr(pairs, "FLEX", "off")
            loop = pairs.backbone_hidden(model, packs)
            monkeypatch.setattr(pairs, "FLEX", "on")
            n = len(calls)
            with_flex = pairs.backbone_hidden(model, packs)
            assert len(calls) - n == len(packs) * model.config.num_hidden_layers  # one flex call per pack and layer
            assert (with_flex - loop).abs().max() < 2e-5, float((with_flex - loop).abs().max())

    # the block mask, densely, is the pattern the SDPA loop attends with, built here from the segments
    from torch.nn.attention.flex_attention import create_mask

    layout = pairs.pack(batch["input_ids"], segments)[0][0].layout
    dense = create_mask(layout.block_mask("cpu").mask_mod, 1, 1, layout.tokens, layout.tokens, device="cpu")[0, 0]
    expected = torch.zeros(layout.tokens, layout.tokens, dtype=torch.bool)
    for s, p, a, b in layout.segments:
        expected[s : s + p + a, s : s + p + a] = torch.ones(p + a, p + a, dtype=torch.bool).tril()
        expected[s + p + a : s + p + a + b, s : s + p] = True  # the rejected tail sees the shared prefix
        expected[s + p + a : s + p + a + b, s + p + a : s + p + a + b] = torch.ones(b, b, dtype=torch.bool).tril()
    assert torch.equal(dense, expected)


def test_the_cpu_head_block_and_its_floor_leave_the_values_unchanged():
    """TiledLogProbs' block: 2 MB of float32 (16 rows of the quickstart's 32,064 columns), never fewer
    than 16 rows however large the vocabulary; and the block's height changes nothing but rounding:
    log-probs, entropy and both gradients at 16 rows equal one block of all rows, and full logits."""
    assert pairs.tiled_rows(32064, "cpu") == 16
    assert pairs.tiled_rows(151936, "cpu") == pairs.TILE_ROWS_MIN == 16
    assert pairs.tiled_rows(1000, "cpu") == 2 * 2**20 // 4000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 8, dtype=torch.float64, generator=g)
    w = torch.randn(300, 8, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randint(0, 300, (50,), generator=g)
    grads = []
    for rows in (16, 50, None):
        hh = h.clone().requires_grad_()
        w.grad = None
        if rows is None:  # the truth: full logits
            logp = torch.log_softmax(hh @ w.t(), -1)
            lp, ent = logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
        else:
            lp, ent, *_ = pairs.TiledLogProbs.apply(hh, w, None, t, rows)
        (lp.sum() + 0.3 * ent.sum()).backward()
        grads.append((lp.detach(), ent.detach(), hh.grad, w.grad.clone()))
    for a, b, truth in zip(*grads):  # the statistics are float32 whatever the input: float32's tolerance
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.double(), truth.double(), rtol=1e-5, atol=1e-5)
