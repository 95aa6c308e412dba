"""The quickstart with the pair forward on and off, alternated (A, B, A, B, ...), timed from outside.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quickstart_ab.py [--rounds 2]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/quickstart_ab.py --against /path/to/other/checkout [--rounds 2]

Each round runs `lora-sdpo run recipes/quickstart.toml --set training.prefix_sharing=true|false`
into a fresh directory under /usr/bin/time -v, and prints wall time, peak RSS, user and system CPU
time and minor page faults of each, the ratios on/off, the largest difference between the two
runs' logged losses at the same optimizer step, and the manifest's token accounting.

With `--against DIR` the two arms are this checkout and another one (its own .venv and
recipes/quickstart.toml), both with the recipe as it is: a before/after comparison of a change
(the ratio printed is this checkout's over DIR's). `--env KEY=VALUE` sets a variable for this
checkout's arm only, so `--against . --env ...` prices an environment setting on the same code.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from sidecar import Sidecar

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
    "peak_rss_mb": r"Maximum resident set size \(kbytes\): (\d+)",
    "user_s": r"User time \(seconds\): (\S+)",
    "sys_s": r"System time \(seconds\): (\S+)",
    "minor_faults": r"Minor \(reclaiming a frame\) page faults: (\d+)",
}


def _seconds(text: str) -> float:
    parts = [float(x) for x in text.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def run(sharing: bool, out: Path, tree: Path | None = None, extra_env: dict | None = None) -> dict:
    """One quickstart run: with prefix_sharing on/off in this checkout, or (tree given) as is in that
    checkout (sharing True) or in this one (False)."""
    if tree is None:
        root, extra = ROOT, ["--set", f"training.prefix_sharing={str(sharing).lower()}"]
    else:
        root, extra = (tree if sharing else ROOT), []
    cmd = ["/usr/bin/time", "-v", str(root / ".venv/bin/lora-sdpo"), "run", "recipes/quickstart.toml", "--output", str(out), *extra]
    env = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", **((extra_env or {}) if not sharing or tree is None else {})}
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    r = {}
    for k, pat in FIELDS.items():
        v = re.search(pat, p.stderr).group(1)
        r[k] = _seconds(v) if k == "wall_s" else float(v)
    r["peak_rss_mb"] /= 1024
    # Raw JSON, not lora_sdpo.manifest.read: with --against, `out` was written by another checkout,
    # whose manifest format this one may not read; only `steps[].index` and `tokens` are needed.
    m = json.loads((out / "manifest.json").read_text())
    r["tokens"] = [s.get("tokens") for s in m["steps"]]
    r["losses"] = [[json.loads(x).get("loss") for x in (out / f"step-{s['index']}" / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(x) and "train_runtime" not in json.loads(x)] for s in m["steps"]]
    r["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--against", type=Path, help="another checkout: compare this one with it instead of prefix_sharing on/off")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for this checkout's arm (with --against) or both arms; repeatable")
    ap.add_argument("--json")
    args = ap.parse_args()
    car = Sidecar("quickstart_ab-against" if args.against or args.env else "quickstart_ab")
    extra_env = dict(e.split("=", 1) for e in args.env)
    tree = args.against.resolve() if args.against else None
    name = {True: f"against {tree}", False: "this checkout"} if tree else {True: "prefix_sharing=true", False: "prefix_sharing=false"}
    res = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            for sharing in (True, False):
                r = run(sharing, Path(d) / f"{sharing}-{i}", tree, extra_env)
                res[sharing].append(r)
                print(f"quickstart | {name[sharing]} round {i + 1} (load {r['loadavg']}) | wall {r['wall_s']:.0f}s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB, user {r['user_s']:.0f}s, sys {r['sys_s']:.0f}s, "
                      f"{r['minor_faults'] / 1e6:.1f}M minor faults | tokens {r['tokens']}", flush=True)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    on, off = (res[False], res[True]) if tree else (res[True], res[False])  # the ratio: this checkout / the other
    diff = max(abs(a - b) for r_on, r_off in zip(on, off) for s_on, s_off in zip(r_on["losses"], r_off["losses"]) for a, b in zip(s_on, s_off))
    print(f"quickstart | {'this checkout / ' + str(tree) if tree else 'on/off'} over {args.rounds} rounds | wall {mean(on, 'wall_s') / mean(off, 'wall_s'):.2f}x "
          f"({mean(on, 'wall_s'):.0f}s vs {mean(off, 'wall_s'):.0f}s), peak RSS {mean(on, 'peak_rss_mb'):.0f} MB vs "
          f"{mean(off, 'peak_rss_mb'):.0f} MB, CPU (user+sys) {(mean(on, 'user_s') + mean(on, 'sys_s')) / (mean(off, 'user_s') + mean(off, 'sys_s')):.2f}x, "
          f"minor faults {mean(on, 'minor_faults') / mean(off, 'minor_faults'):.2f}x | largest logged-loss difference at the same "
          f"update {diff:.2e} (losses per step: {len(on[0]['losses'][0])}, {len(on[0]['losses'][-1])})")
    car.figures = {"on": on, "off": off}
    label = ("this checkout", str(tree)) if tree else ("pair forward (prefix_sharing = true)", "TRL's forward (prefix_sharing = false)")
    car.table(f"{args.rounds} round(s), alternated", ["arm", "round", "wall", "peak RSS", "CPU user + sys", "minor page faults"],
              [[label[j] if i == 0 else "", str(i + 1), f"{r['wall_s']:.0f} s", f"{r['peak_rss_mb']:,.0f} MB",
                f"{r['user_s'] + r['sys_s']:.0f} s", f"{r['minor_faults'] / 1e6:.1f}M"]
               for j, rs in enumerate((on, off)) for i, r in enumerate(rs)])
    wall = mean(on, "wall_s") / mean(off, "wall_s")
    rss = mean(on, "peak_rss_mb") / mean(off, "peak_rss_mb")
    car.line(f"{label[0]} / {label[1]}: wall time **{wall:.2f}x**, peak RSS **{rss:.2f}x**, CPU time "
             f"{(mean(on, 'user_s') + mean(on, 'sys_s')) / (mean(off, 'user_s') + mean(off, 'sys_s')):.2f}x.")
    car.line(f"Largest difference between the two arms' logged losses at the same update: {diff:.1e}. Tokens through the backbone "
             "per step, pair forward against TRL's two rows: " + ", ".join(f"{t['backbone']:,} / {t['two_row']:,}" for t in on[0]["tokens"] if t) + ".")
    car.headline = (f"pair forward {wall:.2f}x the wall time of TRL's forward ({mean(on, 'wall_s'):.0f} s against "
                    f"{mean(off, 'wall_s'):.0f} s), peak RSS {rss:.2f}x ({mean(on, 'peak_rss_mb'):,.0f} against {mean(off, 'peak_rss_mb'):,.0f} MB)")
    car.save()
    if args.json:
        Path(args.json).write_text(json.dumps({"on": on, "off": off}, indent=1))


if __name__ == "__main__":
    main()
