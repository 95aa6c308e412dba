"""The planner's memory terms against one training step at Mistral-7B's layer and head shapes, on the CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/memory_7b.py [--json memory_7b.json] [--arms pairs,trl] [--cap-gb G]

A random-initialised Mistral with 7B's shapes but 2 decoder layers (hidden 4096, intermediate
14336, 32 heads, 8 KV heads, vocabulary 32000, untied LM head), saved in bfloat16 and loaded the way
a step loads its base (NF4 from float32, double quantisation, bfloat16 compute), with
recipes/two_step.toml's training settings: the zephyr-qlora LoRA (r 128 on every projection), bf16,
gradient checkpointing, max_length 1024, batch 4 (accumulation 1 here: one micro-batch is what the
peak holds), optim adamw_torch (paged_adamw_32bit needs CUDA). Synthetic pairs whose every sequence
fills max_length (a 256-word prompt), tokenised by TRL. Each arm (the pair forward,
training.prefix_sharing = true, and TRL's own forward, false) runs in its own process under an RSS
cap (bench/memwatch.py), as lora-sdpo runs a step: ResumableDPOTrainer with the precomputed
reference, then `trainer.train()` for one optimizer step.

Measured, two ways:
- autograd's saved tensors (torch.autograd.graph.saved_tensors_hooks: the unique storages a forward
  keeps for its backward, parameters left out), per decoder layer and outside the layers, in one
  forward of the step's batch with checkpointing off: what one layer holds while it is recomputed
  in the checkpointed backward, the planner's per-layer term (`layer_activation_bytes`);
- RSS (VmHWM above the RSS before, high-water mark reset by /proc/self/clear_refs): the weights the
  load adds, the LM head alone (forward + backward of the scored positions' log-probs from fixed
  final hidden states, as the arm's forward computes them), and the whole `trainer.train()` step.
Each is printed next to the planner's term (lora_sdpo/plan.py, `memory_estimate(..., device="cpu")`,
at the tokens the arm actually ran where a term is per token).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
PICO = ROOT / "models" / "pico-llama-phi3"
MB = 2**20
SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=2,
              vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
OVERRIDES = ["training.optim=adamw_torch", "training.gradient_accumulation_steps=1", "training.group_by_length=false"]


TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)  # --tiny: a smoke test


def build(folder: Path, tiny: bool = False) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**(SHAPES | TINY if tiny else SHAPES), sliding_window=None))
    model.to(torch.bfloat16).save_pretrained(folder)


def tokenizer():
    from lora_sdpo.model import load_tokenizer

    tok = load_tokenizer(PICO)  # the Llama vocabulary below 32000; phi-3's extra tokens (eos, pad) are above it
    tok.eos_token, tok.pad_token = "</s>", "<unk>"
    return tok


def recipe_for(folder: Path, arm: str, tiny: bool | None = None):
    from lora_sdpo.recipe import load_recipe

    if tiny is None:
        tiny = (folder.parent / "TINY").exists()
    tiny = ["training.max_length=128", "training.per_device_train_batch_size=2"] if tiny else []
    return load_recipe(ROOT / "recipes" / "two_step.toml",
                       [f"model.path={folder}", *OVERRIDES, *tiny, f"training.prefix_sharing={str(arm == 'pairs').lower()}"])


def child(folder: Path, arm: str, ragged: bool = False) -> dict:
    import datasets
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from lora_sdpo import pairs
    from lora_sdpo.model import load_base, lora_config
    from lora_sdpo.step import reference_logps, reference_view
    from lora_sdpo.trainer import dpo_config
    from lora_sdpo.trl_compat import ResumableDPOTrainer, trl_vocab_tile, use_reference_logps
    from memwatch import reset_peak, status

    recipe = recipe_for(folder, arm)
    t = recipe.recipe.training
    tok = tokenizer()
    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from or have not are but".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    b = t.per_device_train_batch_size
    rows = [{"prompt": text(t.max_length // 4), "chosen": text(t.max_length), "rejected": text(t.max_length)} for _ in range(b)]
    if ragged:  # the last rejected answer ends early: TRL's rows are padded, so its forward gets an attention mask
        rows[-1]["rejected"] = text(t.max_length // 4)
    out: dict = {"arm": arm}

    r0 = status("VmRSS")
    model = load_base(folder, recipe.adapter)
    out["weights"] = status("VmRSS") - r0
    with tempfile.TemporaryDirectory() as d:
        args = dpo_config(recipe.step_settings(1), Path(d))
        args.max_steps = 1
        r0 = status("VmRSS")
        reset_peak()
        trainer = ResumableDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                                      peft_config=lora_config(recipe.adapter))
        # the reference pass as step.py's reference phase runs it
        pairs.install(trainer.model.get_base_model(), enabled=arm == "pairs")
        with reference_view(trainer.model) as start:
            use_reference_logps(trainer, *reference_logps(trainer, start, args.per_device_train_batch_size, 1))
        out["reference_pass_peak"] = status("VmHWM") - r0
        lens = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset]
        assert min(lens) >= t.max_length, lens  # the widest row of each pair fills max_length
        r0 = status("VmRSS")
        reset_peak()
        trainer.train()
        out["train_peak"] = status("VmHWM") - r0

        # One forward of the step's batch, checkpointing off, counting what autograd saves for the backward.
        peft = trainer.model
        base = peft.get_base_model()
        base.gradient_checkpointing_disable()
        peft.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        skip = {p.untyped_storage().data_ptr() for p in peft.parameters()} | {x.untyped_storage().data_ptr() for x in peft.buffers()}
        tag = ["outside"]
        saved: dict[int, tuple[int, str]] = {}
        detail: list = []  # layer 0's saved tensors: shape, dtype, bytes of the storage

        def pack_hook(x):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in saved:
                saved[ptr] = (x.untyped_storage().nbytes(), tag[0])
                if tag[0] == "layer 0":
                    detail.append((list(x.shape), str(x.dtype).replace("torch.", ""), x.untyped_storage().nbytes()))
            return x

        layers = base.model.layers
        hooks = []
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: tag.__setitem__(0, f"layer {i}")))
            hooks.append(layer.register_forward_hook(lambda m, a, o: tag.__setitem__(0, "outside")))
        before = pairs.tokens_of(base).get("backbone", 0)
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda x: x):
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(peft, batch)
        for h in hooks:
            h.remove()
        ids = batch["input_ids"]
        out["two_row_tokens"] = ids.numel()
        out["backbone_tokens"] = pairs.tokens_of(base).get("backbone", 0) - before
        out["saved"] = {k: sum(n for n, g in saved.values() if g == k) for k in [f"layer {i}" for i in range(len(layers))] + ["outside"]}
        out["layer0_detail"] = detail
        del loss, saved
        import gc

        gc.collect()

        # The LM head alone: forward + backward of the scored positions' log-probs from fixed final hidden states.
        labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
        mask = labels[:, 1:] != -100
        with torch.no_grad(), trainer.compute_loss_context_manager():
            if arm == "pairs":
                segs = pairs.pair_segments(ids, batch["attention_mask"])
                packs, starts = pairs.pack(ids, segs)
                h = pairs.backbone_hidden(base, packs)
                _, idx = pairs.gather_index(labels, segs, starts)
                h = h[idx]
            else:
                h = base.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
                h = h.reshape(-1, h.shape[-1])
        h = h.detach().requires_grad_(True)
        w = base.lm_head.weight
        out["scored_tokens"] = int(mask.sum())
        r0 = status("VmRSS")
        reset_peak()
        with trainer.compute_loss_context_manager():
            if arm == "pairs":
                lp = pairs.head_log_probs(h, w, None, labels[:, 1:][mask], base.config)[0]
            else:
                lp = ChunkedLogProbFunction.apply(h, w, None, labels[:, 1:].clamp(min=0).reshape(-1), 1.0, trl_vocab_tile(),
                                                  None, 1.0, ("log_probs", "entropy", "mean_logits", "is_top1"))[0]
                lp = lp.view(mask.shape)[mask]
            lp.sum().backward()
        out["head_peak"] = status("VmHWM") - r0
    return out


def planner(tiny: bool, arm: str, tokens: int | None = None) -> dict:
    from lora_sdpo.plan import layer_activation_bytes, memory_estimate

    config = SHAPES | TINY if tiny else SHAPES
    recipe = recipe_for(PICO, arm, tiny)  # any model folder: the terms come from SHAPES
    t, a = recipe.recipe.training, recipe.adapter
    act = 2 if t.precision == "bf16" else (2 if a.compute_dtype == "bfloat16" else 4)
    parts = memory_estimate(config, a, t, device="cpu", tokens=tokens)
    return {"parts": parts, "layer_per_token": layer_activation_bytes(config, a, act, pair_forward=arm == "pairs"),
            "outside_per_token": config["hidden_size"] * (act + 4), "tokens": t.per_device_train_batch_size * 2 * t.max_length}


def report(results: dict, tiny: bool, car=None) -> None:
    """Each arm's measured figures next to the planner's terms (the planner of this checkout); into `car`'s tables if given."""
    for arm, res in results.items():
        if "oom_at" in res:
            print(f"{arm}: OUT OF MEMORY: killed at {res['oom_at'] / MB:,.0f} MB RSS")
            continue
        m = res["measured"]
        tokens = m["backbone_tokens"]
        p = planner(tiny, arm, tokens)
        parts = p["parts"]
        train_terms = sum(v for k, v in parts.items() if k != "base weights")
        act_term = next(v for k, v in parts.items() if k.startswith("activations"))
        print(f"\n{arm} ({'pair forward' if arm == 'pairs' else 'TRL two-row forward'}): {tokens} backbone tokens "
              f"({m['two_row_tokens']} two-row, {m['scored_tokens']} scored); the planner's terms below at these tokens "
              f"(`plan` itself assumes {p['tokens']}, batch x 2 x max_length)")
        print("| term | measured | planner | planner / measured |\n|---|---|---|---|")
        rows = []

        def row(name, meas, est, unit=MB, label="MB"):
            rows.append([name, f"{meas / unit:,.0f} {label}", f"{est / unit:,.0f} {label}", f"{est / meas:.2f}"])
            print("| " + " | ".join(rows[-1]) + " |")

        for k in sorted(k for k in m["saved"] if k.startswith("layer")):
            row(f"{k}: saved for backward, per token", m["saved"][k] / tokens, p["layer_per_token"], 1, "bytes")
            row(f"{k}: saved for backward at {tokens} tokens", m["saved"][k], p["layer_per_token"] * tokens)
        row("outside the layers: saved for backward", m["saved"]["outside"], p["outside_per_token"] * tokens)
        row("LM head alone: peak RSS above start (fwd + bwd)", m["head_peak"], parts["LM head tile"])
        row("weights: RSS the load adds", m["weights"], parts["base weights"])
        row("trainer.train(), one step (checkpointing on): peak RSS above start", m["train_peak"], train_terms)
        if car is not None:
            car.table(f"{arm} ({'pair forward' if arm == 'pairs' else 'TRL two-row forward'}), {tokens} backbone tokens",
                      ["term", "measured", "planner", "planner / measured"], rows)
            car.figures.setdefault("planner_over_measured_train_peak", {})[arm] = train_terms / m["train_peak"]
        print(f"(planner: activations {act_term / MB:,.0f} MB, LM head {parts['LM head tile'] / MB:,.0f} MB, LoRA states "
              f"{parts['LoRA weights, grads, optimizer states'] / MB:,.0f} MB, dequantised weight {parts['dequantised weight'] / MB:,.0f} MB; "
              f"the arm's process peaked at {m.get('process_peak_rss', 0) / MB:,.0f} MB RSS, its reference pass at "
              f"{m['reference_pass_peak'] / MB:,.0f} MB above start)")


def main() -> None:
    from memwatch import GB, default_cap, run_capped

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="pairs,trl")
    ap.add_argument("--cap-gb", type=float, help="kill an arm whose RSS passes this (default: available memory less 2 GB)")
    ap.add_argument("--tiny", action="store_true", help="a smoke test: hidden 256, max_length 128, batch 2")
    ap.add_argument("--json")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--ragged", action="store_true", help="one rejected answer short, so that TRL's batch is padded (an attention mask)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--from-json", help="print the tables of an earlier --json against this checkout's planner")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report({k: v for k, v in saved.items() if k != "tiny"}, saved.get("tiny", False))
        return
    if args.build:
        build(Path(args.build), args.tiny)
        return
    if args.child:
        folder, arm, out = args.child
        Path(out).write_text(json.dumps(child(Path(folder), arm, args.ragged)))
        return

    from sidecar import Sidecar

    car = Sidecar("memory_7b" + ("-tiny" if args.tiny else ""))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cap = int(args.cap_gb * GB) if args.cap_gb else default_cap()
    work = Path(tempfile.mkdtemp(prefix="sdpo-mem7b-"))
    folder = work / "mistral-2l"
    if args.tiny:
        (work / "TINY").touch()
    r = run_capped([sys.executable, __file__, "--build", str(folder), *(["--tiny"] if args.tiny else [])], cap, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"building the model failed{' (out of memory)' if r.out_of_memory else ''}:\n{r.stderr[-3000:]}")
    results = {}
    for arm in args.arms.split(","):
        res = work / f"{arm}.json"
        r = run_capped([sys.executable, __file__, "--child", str(folder), arm, str(res), *(["--ragged"] if args.ragged else [])], cap, env=env, cwd=ROOT)
        if r.out_of_memory:
            print(f"{arm}: OUT OF MEMORY: killed at {r.max_rss / MB:,.0f} MB RSS (cap {cap / MB:,.0f} MB)")
            results[arm] = {"oom_at": r.max_rss}
            continue
        if r.returncode != 0:
            sys.exit(f"{arm}: the child failed:\n{r.stderr[-4000:]}")
        m = json.loads(res.read_text())
        m["process_peak_rss"] = r.max_rss
        results[arm] = {"measured": m}
    report(results, args.tiny, car)
    car.figures["results"] = results
    ratios = car.figures.get("planner_over_measured_train_peak", {})
    car.headline = "planner's training peak / measured at Mistral-7B's layer shapes: " + (
        ", ".join(f"{arm} {r:.2f}x" for arm, r in ratios.items()) or "no arm finished")
    car.save()
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "tiny": args.tiny}, indent=1))


if __name__ == "__main__":
    main()
