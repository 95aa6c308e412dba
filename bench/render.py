"""Render BENCHMARKS.md from the benchmark sidecars in bench/results/ (see bench/sidecar.py).

    .venv/bin/python bench/render.py            # rewrite BENCHMARKS.md
    .venv/bin/python bench/render.py --check    # exit 1 if the page and the sidecars disagree

The page holds the latest result of each benchmark: its headline, what it measures and means, its
command, the machine and load it ran under, and its tables. What a section says about a result
is written here without figures, so that it stays true when the figures change; every figure comes
from a sidecar. History stays in git (`git log -p bench/results/`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "BENCHMARKS.md"

# (sidecar name, heading, what it measures and how to read it), in page order.
SECTIONS: list[tuple[str, str, str]] = [
    ("quickstart_ab", "The quickstart: pair forward against TRL's forward",
     "The shipped quickstart with `training.prefix_sharing` on (the default: the prompt once, pairs packed, the LM "
     "head on completion tokens only) and off (TRL's two-row forward), each run its own process, alternated. Both "
     "compute the same DPO loss, so their logged losses must agree to rounding."),
    ("end_to_end", "End to end: `lora-sdpo run` against the same two steps written by hand",
     "`bench/hand_trl.py` does the quickstart's two steps as a user would with TRL and PEFT (4-bit load, DPOTrainer "
     "with a LoRA config and a precomputed reference, `merge_and_unload`), same rows and settings, without what "
     "lora-sdpo adds (data checks, retention, gamma matrix, report). Separate processes, timed from outside; the "
     "step anatomy is each phase's share of lora-sdpo's steps."),
    ("end_to_end-avx2", "End to end on an AVX2-only instruction set",
     "The same with `ONEDNN_MAX_CPU_ISA=AVX2`: oneDNN computes as on a CPU without AVX-512 or AMX. torch's own "
     "kernels still use what the CPU has, so a true AVX2 machine can be slower."),
    ("pair_forward-smollm2", "Training update at a real model's shape: SmolLM2-135M-Instruct",
     "One DPO update (8 pairs, forward and backward, against precomputed reference log-probs) and the reference "
     "pass, on SmolLM2-135M-Instruct (`lora-sdpo fetch smollm2`) loaded as a step's base (NF4, float32 compute, "
     "LoRA r16), on the shipped pairs at the SmolLM2 recipe's max_length: lora-sdpo's pair forward against TRL's "
     "two-row forward on random batches, each in its own process, alternated. Peak RSS is the whole child."),
    ("logprobs", "Log-probs: TRL's fused LM head against full logits",
     "`log p(label)` and its gradient with respect to the hidden states, float32, interleaved in one process: TRL's "
     "`ChunkedLogProbFunction` as `add_fused_lm_head` uses it (32768-wide vocabulary tiles on the CPU), full "
     "`log_softmax`, and TRL's function with a 4096-wide tile. The fused paths must be exact to float32 rounding."),
    ("padding", "Padding: random batches against length-grouped batches",
     "Random order against transformers' `LengthGroupedSampler`, replayed over the shipped data's token lengths "
     "(no training): the padded share of TRL's batches and the tokens processed."),
    ("plan_check", "Memory planner against measured peaks (CPU)",
     "`lora-sdpo plan`'s estimate of a training step's peak against the peak RSS of a real step in a fresh process, "
     "checkpointing off and on. An estimate above the measurement is the safe side."),
    ("quickstart_memory", "The quickstart's memory, phase by phase",
     "RSS sampled every 50 ms through `lora-sdpo run recipes/quickstart.toml`, by phase."),
    ("merge_memory", "Merge: memory and time on a 1 GB model",
     "`lora-sdpo merge` of a rank-16 LoRA on every projection of a random 1.08 GB float32 Llama against PEFT's "
     "`merge_and_unload`, and `cp` as the floor, each in its own process. lora-sdpo streams and fsyncs what it "
     "writes, so `cp` + `sync` is the fair floor."),
]

# Sections rendered only when their sidecar exists; otherwise listed under "Not on this page" with the
# command that brings them back (script defaults are the figures' settings).
LATER: list[tuple[str, str, str]] = [
    ("pair_forward", "Pair forward at hidden 1024 x 8 layers, max_length 1024", "bench/pair_forward.py --rounds 2"),
    ("flex_cpu", "Compiled FlexAttention against the SDPA loop for passes without gradients", "bench/flex_cpu.py"),
    ("memory_7b", "The planner against one step at Mistral-7B's layer shapes", "bench/memory_7b.py"),
    ("merge_divergence", "Which merge base, W or dequant(NF4(W)), against the trained model",
     "bench/merge_bench.py divergence --run RUN_DIR"),
    ("gamma_sample", "The gamma matrix's sample size against its standard error", "bench/gamma_sample.py RUN_DIR"),
]
MEANING_LATER = ("Rendered as the script's own tables; see the script's docstring for what it measures.")

HEADER = """# Benchmarks

Generated by `.venv/bin/python bench/render.py` from the JSON sidecars in `bench/results/`, one per
benchmark, each written by the script that measured it (command, commit, date, machine, load, every
figure). Do not edit this page: rerun the benchmark's command, then the render. Earlier results are
in git (`git log -p bench/results/`).

**Load** is the 1-minute load average sampled while the benchmark ran (start, end, highest). A
benchmark's own threads count: about 2 on a 2-core machine, so a figure above ~2.5 means something
else was running and wall times are inflated. Memory figures and numerical differences do not
depend on the load; ratios of alternated runs depend on it least.
"""

FOOTER = """## GPU: not measured

No GPU has run this code: no tokens/s, MFU or GPU peak memory here. `bench/gpu_accept.sh` is the one
command for the first GPU (the exactness tests on CUDA, the quickstart in float32 and bf16, and
`bench/gpu_step.py`'s step at Mistral-7B's shapes for the pair forward and plain TRL);
`bench/gpu_rehearsal.sh` rehearses it on a CPU.
"""


def load_sidecars(folder: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


SETUP_KEYS = ("threads", "onednn_max_cpu_isa")  # settings of one run, not of the machine


def machine(m: dict) -> str:
    isa = ", ".join(m.get("isa", [])) or "no AVX2"
    libs = ", ".join(f"{k} {m[k]}" for k in ("transformers", "trl", "peft", "bitsandbytes") if k in m)
    return (f"{m['cpu']}, {m['cores']} cores ({isa}), {m['ram_gb']} GB RAM; Python {m['python']}, torch {m.get('torch', '?')}, "
            f"{libs}")


def shared_machine(sidecars: dict[str, dict]) -> str | None:
    """The machine line, when every sidecar ran on the same machine and stack (else None: each section says)."""
    lines = {machine({k: v for k, v in s["machine"].items() if k not in SETUP_KEYS}) for s in sidecars.values()}
    return lines.pop() if len(lines) == 1 else None


def run_line(s: dict, shared: str | None) -> str:
    m, ld = s["machine"], s["load"]
    where = "" if shared else f"*Machine:* {machine(m)}. "
    capped = f" with `ONEDNN_MAX_CPU_ISA={m['onednn_max_cpu_isa']}`" if m.get("onednn_max_cpu_isa") else ""
    dirty = " with uncommitted changes" if s.get("dirty") else ""
    return (f"{where}*Run* {s['date']}{capped}, commit {s['commit']}{dirty}, {s['wall_s']:.0f} s; *load* {ld['start']:.2f} -> "
            f"{ld['end']:.2f} (highest {ld['max']:.2f}).")


def table(t: dict) -> str:
    out = [f"**{t['title']}**", ""] if t.get("title") else []
    out += ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
    out += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    return "\n".join(out)


def render(sidecars: dict[str, dict]) -> str:
    sections = SECTIONS + [(name, heading, MEANING_LATER) for name, heading, _ in LATER]
    known = [s for s in sections if s[0] in sidecars]
    unknown = sorted(set(sidecars) - {s[0] for s in sections})
    if unknown:
        raise SystemExit(f"bench/results: no section in bench/render.py for {', '.join(unknown)}: add one to SECTIONS or delete the file")
    shared = shared_machine({n: sidecars[n] for n, _, _ in known})
    parts = [HEADER]
    if shared:
        parts += [f"**Machine** of every result below: {shared}.", ""]
    parts += ["## At a glance", "", "| benchmark | result | highest load |", "|---|---|---|"]
    for name, heading, _ in known:
        s = sidecars[name]
        parts.append(f"| {heading} | {s['headline']} | {s['load']['max']:.1f} |")
    parts.append("")
    for name, heading, meaning in known:
        s = sidecars[name]
        parts += [f"## {heading}", "", f"    {s['command']}", "", meaning, "", run_line(s, shared), ""]
        for t in s["tables"]:
            parts += [table(t), ""]
        parts += [f"- {line}" for line in s["lines"]]
        if s["lines"]:
            parts.append("")
    missing = [(cmd, heading) for name, heading, cmd in LATER if name not in sidecars]
    missing += [(f"bench/results/{name}.json", heading) for name, heading, _ in SECTIONS if name not in sidecars]
    if missing:
        parts += ["## Not on this page", "", "Not rerun since this page became generated, so no figures here (earlier ones are in "
                  "git); the command brings a result back:", ""]
        parts += [f"- {what}: `{cmd}`" for cmd, what in missing]
        parts.append("")
    parts.append(FOOTER)
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md is not what the sidecars render")
    a = ap.parse_args()
    text = render(load_sidecars())
    if a.check:
        if PAGE.read_text() != text:
            sys.exit("BENCHMARKS.md does not match bench/results/: run .venv/bin/python bench/render.py")
        print("BENCHMARKS.md matches bench/results/")
        return
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(PAGE)
    print(f"BENCHMARKS.md: {len(text.encode())} bytes from {len(load_sidecars())} sidecars")


if __name__ == "__main__":
    main()
