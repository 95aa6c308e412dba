"""End to end and step anatomy: `lora-sdpo run` of the quickstart against bench/hand_trl.py.

Both run the same two steps on the same rows with the same settings, each in its own process,
interleaved (lora-sdpo, hand, hand, lora-sdpo, ... for --rounds), so that a load change on a
shared machine hits both. Wall time and peak RSS are measured from outside (os.wait4); the parts
come from lora-sdpo's manifest (`timings` of each step) and from the hand script's JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/end_to_end.py [--pairs 64] [--epochs 2] [--rounds 1]

--pairs and --epochs scale the quickstart down (the shipped recipe: 64 pairs per step, 2 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_sdpo import manifest  # noqa: E402
from lora_sdpo.data import load_step_pairs  # noqa: E402
from lora_sdpo.recipe import load_recipe  # noqa: E402
from sidecar import Sidecar  # noqa: E402

PARTS = ("load", "reference", "train", "merge", "retention", "diagnostics")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, stdout) of one child process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=64, help="pairs per step (the quickstart: 64)")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", help="write every measurement here")
    a = p.parse_args()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower()
    scaled = (a.pairs, a.epochs) != (64, 2)
    car = Sidecar("end_to_end" + (f"-{isa}" if isa else "") + (f"-{a.pairs}p{a.epochs:g}e" if scaled else ""))
    overrides = [f"steps.{i}.sources.0.limit={a.pairs}" for i in range(2)] + [f"training.num_train_epochs={a.epochs}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml", overrides)
    work = Path(tempfile.mkdtemp(prefix="sdpo-e2e-"))
    data = []
    for i in range(2):  # the rows lora-sdpo trains on, normalised, as the hand script's input
        f = work / f"D{i + 1}.jsonl"
        f.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in load_step_pairs(recipe, i).rows))
        data.append(str(f))
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    runs = {"lora-sdpo": [], "hand": []}
    order = []
    for r in range(a.rounds):
        order += ["lora-sdpo", "hand"] if r % 2 == 0 else ["hand", "lora-sdpo"]
    for n, who in enumerate(order):
        out = work / f"{who}-{n}"
        before = loadavg()
        if who == "lora-sdpo":
            cmd = [py, "-m", "lora_sdpo", "run", "recipes/quickstart.toml", "--output", str(out)]
            wall, rss, _ = timed(cmd + [x for o in overrides for x in ("--set", o)])
            steps = manifest.read(out).steps
            parts = {k: sum(s.timings.get(k, 0) for s in steps) for k in PARTS + ("total",)}
            parts["first_loss"] = [s.first_loss for s in steps]
        else:
            wall, rss, text = timed([py, "bench/hand_trl.py", "--data", *data, "--output", str(out), "--epochs", str(a.epochs)])
            parts = json.loads(text.strip().splitlines()[-1])
        runs[who].append({"wall": wall, "peak_rss_mb": rss, "load_before": before, "load_after": loadavg(), **parts})
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))

    lo, hand = runs["lora-sdpo"], runs["hand"]
    loads = ", ".join(f"{r['load_before']}->{r['load_after']}" for r in lo + hand)
    scale = f"{a.pairs} pairs/step, {a.epochs:g} epochs"
    mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
    print(
        f"end-to-end | quickstart 2 steps ({scale}) | lora-sdpo {mean(lo, 'wall'):.1f}s vs hand-written TRL+PEFT "
        f"{mean(hand, 'wall'):.1f}s: ratio {mean(lo, 'wall') / mean(hand, 'wall'):.2f} (mean of {a.rounds}) | "
        f"peak RSS {mean(lo, 'peak_rss_mb'):.0f} vs {mean(hand, 'peak_rss_mb'):.0f} MB | loadavg {loads}"
    )
    for k in ("load", "reference", "train", "merge"):
        print(f"end-to-end | part {k} | lora-sdpo {mean(lo, k):.1f}s vs hand {mean(hand, k):.1f}s")
    print(f"end-to-end | first losses | lora-sdpo {lo[0]['first_loss']} vs hand {hand[0]['first_loss']}")
    car.figures = runs
    each = lambda rs, k, f: " / ".join(f.format(r[k]) for r in rs)  # noqa: E731
    rows = [["wall time, whole process", each(lo, "wall", "{:.1f} s"), each(hand, "wall", "{:.1f} s")],
            ["peak RSS", each(lo, "peak_rss_mb", "{:,.0f} MB"), each(hand, "peak_rss_mb", "{:,.0f} MB")]]
    rows += [[f"part: {k}", each(lo, k, "{:.1f} s"), each(hand, k, "{:.1f} s")] for k in ("load", "reference", "train", "merge")]
    rows += [[f"part: {k}", each(lo, k, "{:.1f} s"), "not done"] for k in ("retention", "diagnostics")]
    rows.append(["first loss, steps 1 and 2", ", ".join(f"{x:.4f}" for x in lo[0]["first_loss"]),
                 ", ".join(f"{x:.4f}" for x in hand[0]["first_loss"])])
    car.table(f"quickstart, 2 steps ({scale}); {a.rounds} round(s), each figure per round", ["", "lora-sdpo run", "hand-written TRL + PEFT"], rows)
    ratio = mean(lo, "wall") / mean(hand, "wall")
    core = sum(mean(lo, k) for k in ("load", "reference", "train", "merge"))
    hand_core = sum(mean(hand, k) for k in ("load", "reference", "train", "merge"))
    car.line(f"lora-sdpo / hand-written, whole process: **{ratio:.2f}x** the wall time; load + reference + training + merge "
             f"alone: {core / hand_core:.2f}x ({core:.1f} s against {hand_core:.1f} s).")
    car.headline = (f"`lora-sdpo run` {ratio:.2f}x the hand-written TRL + PEFT script's wall time ({mean(lo, 'wall'):.0f} s against "
                    f"{mean(hand, 'wall'):.0f} s; {scale}); peak RSS {mean(lo, 'peak_rss_mb'):,.0f} against {mean(hand, 'peak_rss_mb'):,.0f} MB")
    # Step anatomy: shares of lora-sdpo's step time (sum over both steps).
    tot = mean(lo, "total")
    shares = {k: mean(lo, k) / tot for k in PARTS}
    extra = shares["load"] + shares["merge"] + shares["retention"]
    print(
        "step anatomy | quickstart (" + scale + ") | "
        + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
        + f", other {1 - sum(shares.values()):.1%} | sDPO's additions (load+merge+retention) {extra:.1%} of the steps"
        + f" ({extra + shares['diagnostics']:.1%} with the gamma matrix) | steps {tot:.1f}s of {mean(lo, 'wall'):.1f}s wall"
    )
    first = manifest.read(work / f"lora-sdpo-{order.index('lora-sdpo')}").steps
    car.table("step anatomy: lora-sdpo's phases (first round), seconds per step and share of the steps (all rounds)",
              ["phase", *[f"step {i + 1} (s)" for i in range(len(first))], "share of the steps"],
              [[k, *[f"{st.timings.get(k, 0):.1f}" for st in first], f"{shares[k]:.1%}"] for k in PARTS])
    car.line(f"sDPO's additions to a DPO step (load + merge + retention): {extra:.1%} of the steps; "
             f"{extra + shares['diagnostics']:.1%} with the gamma matrix (`diagnostics.gamma_matrix = false` turns it off).")
    car.save()


if __name__ == "__main__":
    main()
