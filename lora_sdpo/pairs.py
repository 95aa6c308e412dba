"""The pair forward: each preference pair as one sequence, the prompt once, no padding, the LM head
on completion tokens only.

TRL's DPOTrainer (DataCollatorForPreference) hands the model 2B rows, padded to the longest:

    row i       [ prompt_i | chosen_i   | pad pad pad ]        the prompt twice,
    row B + i   [ prompt_i | rejected_i | pad ]                padding everywhere,
                                                               every position through the LM head (off CUDA)

and reads back per-token log-probs in that layout (`model(..., labels=, fused_lm_head=True)`).
Here the two rows of pair i become one segment, and the segments are packed into one row:

    tokens     [ shared_1      | chosen tail_1 | rejected tail_1 | shared_2 | ... ]
    positions    0 .. P-1        P .. P+a-1      P .. P+b-1        0 ..
    attends to   shared_1        shared_1 +      shared_1 +        shared_2 ...
                 (causal)        itself          itself (never the chosen tail)

`shared` is the longest common prefix of the two rows (the prompt, and any completion tokens the
two answers begin with). Every token then sees exactly the tokens and positions it sees in its own
row, so it gets the same hidden state and the same log-prob as in TRL's layout: the result is
exact up to float rounding, not an approximation. A pair costs P + a + b tokens of the backbone
instead of 2 * (longest row of the batch). Pairs never attend to each other; a forward packs them
up to PACK_TOKENS tokens per backbone call.

Attention is a registered transformers attention function (`AttentionInterface`). On CUDA/XPU
(FLEX = "auto"): one compiled FlexAttention call per pack with a block mask built from the layout.
Elsewhere, the SDPA loop: per pair, one causal SDPA over [shared | chosen tail], and one SDPA of
the rejected tail's queries over the shared keys and values plus its own (the shared K/V are
reused, not recomputed: flash-pref's trick without the varlen kernel). Calls without a pair layout
(generation, anything else) go to plain SDPA. The layout travels in the forward's kwargs, so
gradient checkpointing replays it.

The LM head scores only the positions whose next token is a completion token: on CUDA through
TRL's public `trl.kernels.ChunkedLogProbFunction` (Triton) with a vocabulary tile sized so that one
[tokens x vocab] tile stays under TILE_BYTES, elsewhere through TiledLogProbs. The branch is TRL's
own predicate `trl.kernels.chunked_logprob._use_triton`, read at call time through trl_compat.py
(tests/test_triton_head.py sets it to run the Triton branch on CPU tensors under Triton's interpreter). The output is TRL's
`FusedCausalLMOutput` in the padded two-row layout (log_probs, entropy, mean_logits, is_top1,
log_sum_sq_probs), so TRL's loss code, metrics and every loss_type read it unchanged.

`install(model)` wraps the forward TRL's `add_fused_lm_head` put on the model. With
`enabled=False` the wrapper only counts tokens and calls TRL's forward: TRL's path, batch for batch.
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION = "lora_sdpo_pairs"
# Tokens per backbone call; a batch over it is split into several calls (pairs are never split).
PACK_TOKENS = 8192
# Bytes of one [tokens x vocabulary] tile of the LM head (the kernel keeps a few such temporaries).
TILE_BYTES = {"cuda": 512 * 2**20, "xpu": 512 * 2**20}
# Elsewhere (TiledLogProbs): a block of rows across the whole vocabulary. 2 MB (16 rows of a 32k
# vocabulary) rather than 16 MB took most of 120 MB off the quickstart's peak at no cost in time
# (BENCHMARKS.md); at least TILE_ROWS_MIN rows so that a large vocabulary's weight is not streamed
# for a handful of tokens at a time.
TILE_BYTES_DEFAULT = 2 * 2**20
TILE_ROWS_MIN = 16
HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class Layout:
    """Where each pair's parts sit in one packed row: (start, shared, chosen tail, rejected tail)."""

    segments: list[tuple[int, int, int, int]]
    # FlexAttention's block mask of this pack, built on first use and reused by every layer (and by
    # gradient checkpointing's replay): keyed by device
    _block_masks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return sum(p + a + b for _, p, a, b in self.segments)

    def block_mask(self, device):
        """The pack's attention pattern as a FlexAttention BlockMask: a token attends to earlier tokens of
        its own pair (causal in packed order), except that the rejected tail never sees the chosen tail."""
        key = str(device)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            pair = torch.empty(self.tokens, dtype=torch.int32)
            part = torch.empty(self.tokens, dtype=torch.int8)  # 0 shared, 1 chosen tail, 2 rejected tail
            for i, (s, p, a, b) in enumerate(self.segments):
                pair[s : s + p + a + b] = i
                part[s : s + p], part[s + p : s + p + a], part[s + p + a : s + p + a + b] = 0, 1, 2
            pair, part = pair.to(device), part.to(device)

            def mask_mod(b, h, q, kv):
                return (pair[q] == pair[kv]) & (kv <= q) & ~((part[q] == 2) & (part[kv] == 1))

            self._block_masks[key] = create_block_mask(mask_mod, None, None, self.tokens, self.tokens, device=device)
        return self._block_masks[key]


@dataclass
class PairState:
    """What `install` keeps on a model: TRL's forward, the switch, and the token tally of training."""

    trl_forward: object
    enabled: bool = True
    tokens: dict = field(default_factory=lambda: {"backbone": 0, "two_row": 0, "completion": 0})


# ---------------------------------------------------------------------------------------------
# Attention


def _rejected_mask(p: int, b: int, device) -> torch.Tensor:
    """Rejected tail's queries (b) over [shared (p) | rejected tail (b)]: all of shared, causal on itself."""
    mask = torch.ones(b, p + b, dtype=torch.bool, device=device)
    mask[:, p:] = torch.ones(b, b, dtype=torch.bool, device=device).tril()
    return mask


# Which attention runs a pack: "auto" = one FlexAttention call per pack on CUDA/XPU, the SDPA loop
# elsewhere; "on" = FlexAttention wherever it can run (off CUDA only without gradients: the CPU has
# no flex backward); "off" = the SDPA loop everywhere. The environment's LORA_SDPO_FLEX sets it.
FLEX = os.environ.get("LORA_SDPO_FLEX", "auto")


def use_flex(query, key, value, dropout: float) -> bool:
    """Whether this attention call takes FlexAttention (see FLEX); dropout needs the SDPA loop."""
    if FLEX not in ("auto", "on", "off"):
        raise ValueError(f"LORA_SDPO_FLEX={FLEX!r}: expected auto, on or off")
    if FLEX == "off" or dropout > 0:
        return False
    accelerator = query.device.type in ("cuda", "xpu")
    if FLEX == "auto" or accelerator:
        return accelerator
    return not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))


@functools.cache
def compiled_flex():
    """flex_attention compiled once, dynamic shapes (a new pack length does not recompile)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_pack_attention(query, key, value, layout: Layout, scaling=None):
    """The whole pack in one FlexAttention call with the layout's block mask; (1, T, heads, d)."""
    gqa = query.shape[1] != key.shape[1]
    out = compiled_flex()(query, key, value, block_mask=layout.block_mask(query.device), scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def pair_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: per-pair segments when a layout is passed, plain SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: Layout | None = kwargs.pop("lora_sdpo_pairs", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if use_flex(query, key, value, dropout):
        return flex_pack_attention(query, key, value, layout, scaling), None
    # query (1, heads, T, d); key, value (1, kv_heads, T, d)
    gqa = query.shape[1] != key.shape[1]
    out = []
    for s, p, a, b in layout.segments:
        head = slice(s, s + p + a)  # shared + chosen tail: ordinary causal attention
        out.append(F.scaled_dot_product_attention(query[:, :, head], key[:, :, head], value[:, :, head],
                                                  dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa))
        if b:
            tail = slice(s + p + a, s + p + a + b)
            k = torch.cat([key[:, :, s : s + p], key[:, :, tail]], dim=2)
            v = torch.cat([value[:, :, s : s + p], value[:, :, tail]], dim=2)
            out.append(F.scaled_dot_product_attention(query[:, :, tail], k, v, attn_mask=_rejected_mask(p, b, query.device),
                                                      dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, pair_attention)
    # masks for calls without a layout are SDPA's; with one, a placeholder 4D mask skips mask building
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# The LM head off CUDA


class TiledLogProbs(torch.autograd.Function):
    """Per-token log-probs of `hidden @ weight.T` (+ entropy, log sum p^2, mean logit, is_top1) in
    blocks of tokens over the whole vocabulary, for devices without Triton.

    TRL's `ChunkedLogProbFunction` folds vocabulary tiles into online-softmax statistics, which on
    Triton is one fused pass; its torch fallback spends a dozen elementwise passes and temporaries
    per tile. With a block of rows across the whole vocabulary the same statistics are a few
    vectorised reductions (logsumexp, dot products), and the backward is one exp, one scale and one
    scatter per block. Memory: a few [rows x vocab] float32 blocks, rows chosen by TILE_BYTES.
    The values are TRL's definitions (is_top1: the label is the first maximum).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        ctx.set_materialize_grads(False)
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        # the projection runs in `dtype`; the statistics stay float32 (autocast would round vecdot to bf16)
        with torch.autocast(hidden.device.type, enabled=False):
            return TiledLogProbs._forward(ctx, hidden, weight, bias, targets, rows, dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, rows, dtype):
        n = hidden.shape[0]
        out = [torch.empty(n, device=hidden.device) for _ in range(4)] + [torch.empty(n, dtype=torch.bool, device=hidden.device)]
        lp, ent, sq, mean, top = out
        lse_all = torch.empty(n, device=hidden.device)
        w = weight.to(dtype)
        for s in range(0, n, rows):
            e = slice(s, min(s + rows, n))
            z = (hidden[e].to(dtype) @ w.t()).float()
            if bias is not None:
                z += bias.float()
            t = targets[e]
            lse = torch.logsumexp(z, -1)
            lse_all[e] = lse
            lp[e] = z.gather(1, t[:, None])[:, 0] - lse
            mean[e] = z.mean(-1)
            top[e] = z.argmax(-1) == t
            p = torch.exp(z - lse[:, None])
            ent[e] = lse - torch.linalg.vecdot(p, z)
            sq[e] = torch.log(torch.linalg.vecdot(p, p))
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all, ent)
        ctx.rows, ctx.dtype = rows, dtype
        ctx.mark_non_differentiable(sq, mean, top)
        return lp, ent, sq, mean, top

    @staticmethod
    def backward(ctx, g_lp, g_ent, *_):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return TiledLogProbs._backward(ctx, g_lp, g_ent)

    @staticmethod
    def _backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse_all, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, n = ctx.dtype, hidden.shape[0]
        w = weight.to(dtype)
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, n, ctx.rows):
            e = slice(s, min(s + ctx.rows, n))
            h = hidden[e].to(dtype)
            z = (h @ w.t()).float()
            if bias is not None:
                z += bias.float()
            logp = z.sub_(lse_all[e][:, None])  # z is log p from here on
            p = torch.exp(logp)
            # d log p_t / dz = onehot(t) - p;  d entropy / dz = -p (log p + entropy)
            grad = torch.zeros_like(p)
            if g_lp is not None:
                grad.addcmul_(p, -g_lp[e][:, None])
                grad.scatter_add_(1, targets[e][:, None], g_lp[e][:, None].float())
            if g_ent is not None:
                grad.addcmul_(p * (logp + ent[e][:, None]), -g_ent[e][:, None])
            if gh is not None:
                gh[e] = grad.to(dtype) @ w
            if gw is not None:
                gw += grad.t().to(dtype) @ h
            if gb is not None:
                gb += grad.sum(0)
        return (gh.to(hidden.dtype) if gh is not None else None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None)


def head_log_probs(hidden, weight, bias, targets, cfg):
    """The LM head on the scored positions: TRL's Triton kernel on CUDA/XPU, TiledLogProbs elsewhere."""
    from trl.kernels import ChunkedLogProbFunction

    from .trl_compat import use_triton

    softcap, scale = getattr(cfg, "final_logit_softcapping", None), getattr(cfg, "logit_scale", None) or 1.0
    if use_triton(hidden.device) or softcap is not None or scale != 1.0:
        return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0,
                                            vocab_tile(len(targets), weight.shape[0], hidden.device), softcap, scale, HEAD_OUTPUTS)
    return TiledLogProbs.apply(hidden, weight, bias, targets, tiled_rows(weight.shape[0], hidden.device.type))


def tiled_rows(vocab: int, device: str) -> int:
    """Rows of one TiledLogProbs block: a [rows x vocab] float32 block within the byte budget."""
    return max(TILE_ROWS_MIN, TILE_BYTES.get(device, TILE_BYTES_DEFAULT) // (vocab * 4))


# ---------------------------------------------------------------------------------------------
# The forward


def vocab_tile(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Vocabulary columns per LM-head tile so that [min(n, 4096) x tile] float32 stays under the budget."""
    from .trl_compat import token_chunk_size

    budget = TILE_BYTES.get(device.type, TILE_BYTES_DEFAULT)
    rows = max(1, min(n_tokens, token_chunk_size()))
    cols = budget // (rows * 4)
    return int(min(vocab, max(256, cols // 256 * 256)))


def pair_segments(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(shared, chosen tail, rejected tail) per pair of a two-row batch; None if it is not one."""
    rows = input_ids.shape[0]
    if rows % 2 or attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool().cpu()
    lengths = mask.sum(1)
    # right-padded rows only: the first `length` positions are the row
    if not bool((mask == (torch.arange(mask.shape[1])[None] < lengths[:, None])).all()):
        return None
    ids = input_ids.cpu()
    half = rows // 2
    out = []
    for i in range(half):
        lc, lr = int(lengths[i]), int(lengths[half + i])
        m = min(lc, lr)
        diff = (ids[i, :m] != ids[half + i, :m]).nonzero()
        p = int(diff[0]) if len(diff) else m
        out.append((p, lc - p, lr - p))
    return out


def _packs(segments: list[tuple[int, int, int]], budget: int) -> list[list[int]]:
    """Consecutive pairs, up to `budget` tokens per pack (a longer pair goes alone)."""
    packs, cur, size = [], [], 0
    for i, (p, a, b) in enumerate(segments):
        n = p + a + b
        if cur and size + n > budget:
            packs.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        packs.append(cur)
    return packs


@dataclass
class Pack:
    """One backbone call: the packed row, its positions and layout, and each pair's start in it."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    layout: Layout


def pack(input_ids: torch.Tensor, segments: list[tuple[int, int, int]], budget: int = PACK_TOKENS) -> tuple[list[Pack], list[int]]:
    """The packed rows of a two-row batch, and each pair's start in their concatenation."""
    half, device = input_ids.shape[0] // 2, input_ids.device
    packs, starts, offset = [], [0] * half, 0
    for group in _packs(segments, budget):
        ids, pos, layout, size = [], [], [], 0
        for i in group:
            p, a, b = segments[i]
            layout.append((size, p, a, b))
            starts[i] = offset + size
            size += p + a + b
            ids += [input_ids[i, : p + a], input_ids[half + i, p : p + b]]
            pos += [torch.arange(p + a, device=device), torch.arange(p, p + b, device=device)]
        packs.append(Pack(torch.cat(ids)[None], torch.cat(pos)[None], Layout(layout)))
        offset += size
    return packs, starts


def gather_index(labels: torch.Tensor, segments, starts) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored positions of the two-row batch (labels[:, 1:] != -100, TRL's row-major order) and
    where each one's hidden state sits in the packed rows: chosen position j at start + j; rejected
    position j at start + j inside the shared prefix, after the chosen tail beyond it."""
    mask = labels[:, 1:] != -100
    r, j = mask.nonzero(as_tuple=True)
    half = labels.shape[0] // 2
    pair = r % half
    seg = torch.tensor(segments, device=labels.device).reshape(-1, 3)
    shared, chosen_tail = seg[pair, 0], seg[pair, 1]
    start = torch.tensor(starts, device=labels.device)[pair]
    return mask, start + j + torch.where((r >= half) & (j >= shared), chosen_tail, 0)


def backbone_hidden(model, packs: list[Pack]) -> torch.Tensor:
    """Final hidden states of the packed rows, concatenated: (sum of T, hidden)."""
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=packs[0].input_ids.device)  # 4D: no mask built
    hidden = [
        model.base_model(input_ids=p.input_ids, position_ids=p.position_ids, attention_mask=placeholder,
                         use_cache=False, lora_sdpo_pairs=p.layout).last_hidden_state[0]
        for p in packs
    ]
    return torch.cat(hidden) if len(hidden) > 1 else hidden[0]


def _pair_forward(model, state: PairState, input_ids, labels, segments):
    from .trl_compat import FusedCausalLMOutput

    packs, starts = pack(input_ids, segments)
    hidden = backbone_hidden(model, packs)
    mask, idx = gather_index(labels, segments, starts)
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
    targets = labels[:, 1:][mask].to(device)
    per_token = head_log_probs(hidden[idx].to(device), lm_head.weight, lm_head.bias, targets, model.config.get_text_config())
    mask = mask.to(device)
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
    )
    if model.training and torch.is_grad_enabled():
        _count(state, sum(p.input_ids.shape[1] for p in packs), input_ids.numel(), len(targets))
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs, entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1, label_mask=mask,
    )


def _count(state: PairState, backbone: int, two_row: int, completion: int) -> None:
    t = state.tokens
    t["backbone"] += int(backbone)
    t["two_row"] += int(two_row)
    t["completion"] += int(completion)


def install(model, enabled: bool = True) -> PairState:
    """Put the pair forward on a transformers causal LM that TRL's `add_fused_lm_head` has patched.

    Idempotent; a second call only switches `enabled`. Returns the model's PairState.
    """
    state = getattr(model, "_lora_sdpo_pairs", None)
    if state is None:
        state = PairState(trl_forward=model.forward)
        trl_forward = model.forward

        @functools.wraps(type(model).forward)
        def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
            st: PairState = self._lora_sdpo_pairs
            if fused_lm_head and labels is not None and not args and st.enabled:
                ids, am = kwargs.get("input_ids"), kwargs.get("attention_mask")
                # PEFT passes inputs_embeds, output_attentions, ... as None; anything set falls back to TRL
                extra = [k for k, v in kwargs.items() if v is not None and k not in ("input_ids", "attention_mask", "use_cache")]
                segments = pair_segments(ids, am) if ids is not None and not extra else None
                if segments is not None:
                    return _pair_forward(self, st, ids, labels, segments)
            out = trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
            if fused_lm_head and self.training and torch.is_grad_enabled() and kwargs.get("input_ids") is not None:
                ids = kwargs["input_ids"]
                _count(st, ids.numel(), ids.numel(), int((labels[:, 1:] != -100).sum()))
            return out

        model._lora_sdpo_pairs = state
        model.forward = types.MethodType(forward, model)
    state.enabled = enabled
    if enabled:
        _register()
        model.config._attn_implementation = ATTENTION
    return state


def reset_tokens(model, tokens: dict | None = None) -> None:
    """Start the tally (a resumed step starts from its checkpoint's)."""
    state = model._lora_sdpo_pairs
    state.tokens = {"backbone": 0, "two_row": 0, "completion": 0, **(tokens or {})}


def tokens_of(model) -> dict:
    state = getattr(model, "_lora_sdpo_pairs", None)
    return dict(state.tokens) if state is not None else {}
