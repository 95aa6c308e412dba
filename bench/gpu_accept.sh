#!/usr/bin/env bash
# GPU acceptance: one command, at most 8 minutes on one H100/H200 with the wheel install (not yet
# run: no GPU has been available), nothing downloaded (the model and pairs are built on the machine;
# wheels travel in .whl/). The device call's command is `bash bench/gpu_accept.sh` ($OUT is set there).
# bench/gpu_rehearsal.sh runs this same command on a CPU, in a mirror of the image, with only the
# CUDA work skipped (REHEARSAL=1).
#
#   (a) the pair forward's exactness on CUDA, float32 and bf16 (tests/test_cuda.py): the pair
#       forward (FlexAttention + TRL's Triton head) against full logits and TRL's two-row forward,
#       FlexAttention's forward AND backward against the SDPA loop, the Triton head against full logits;
#   (b) the quickstart on CUDA, as shipped (float32) and with the bf16 overrides;
#   (c) one sDPO step at Mistral-7B shapes with LAYERS decoder layers (default 8 of the 32; the
#       layers are identical, so per-layer figures scale) and PAIRS pairs (default 32: two optimizer
#       updates of 16) through bench/gpu_step.py, for the pair forward and plain TRL: tokens/s,
#       peak memory, MFU.
# and prints one table. From the repository root:
#
#   bash bench/gpu_accept.sh            # OUT=folder for logs and JSON (default /tmp/gpu-accept)
#
# Dependencies: on a machine with pip access, `pip install -c LOCK -e '.[test]'` over the CUDA build of
# torch (LOCK: requirements/lock.txt less torch and triton, docs/install.md) is enough. On a machine
# without network whose image lacks the locked versions (trl, bitsandbytes, datasets, pydantic, and
# transformers/peft/huggingface_hub at the lock's versions), assemble
# their wheels first, where pip works: `.venv/bin/python bench/gpu_wheels.py` (for an image
# with Python 3.12 and CUDA 13: 21 wheels, 31 MiB with bitsandbytes cut to its CUDA 13
# libraries), and carry .whl/ with the working tree: they are installed into $SITE (/tmp/site) first. torch
# is the image's own (a CUDA torch wheel is too big to carry), whatever version it is:
# versions.txt records what ran, and an import that fails stops the script before any part.
#
# Each part has its own time limit (A_S, B_S, C_S seconds: 80 + 100 + 220 = 400) so that the whole,
# with the wheel install and the import check (the setup: timed in table.json; bench/gpu_rehearsal.sh
# times it on a CPU and checks the sum), stays within 8 minutes;
# a part that runs out is reported as such and the others still run; (c) writes each arm's JSON as
# it finishes.
#
# REHEARSAL=1 (bench/gpu_rehearsal.sh; ACCEPT_ON_CPU=1 is the same): no GPU; (a) runs the test code
# on the CPU, (b) the quickstart on the CPU without CUDA's memory counters, (c) --rehearse (toy
# shapes on the CPU); the table marks every CUDA-only figure and check "not run here".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-accept}
WORK=${WORK:-/tmp/gpu-accept-work}
LAYERS=${LAYERS:-8}
PAIRS=${PAIRS:-32}
A_S=${A_S:-80}
B_S=${B_S:-100}
C_S=${C_S:-220}
SITE=${SITE:-/tmp/site}
export REHEARSAL=${REHEARSAL:-${ACCEPT_ON_CPU:-}}
T0=$(date +%s%N)
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
# tests/test_cuda.py runs no CLI command: no fork server (tests/cli_server.py) for it
export LORA_SDPO_TEST_FORK=0
python3 - > "$OUT/versions.txt" <<'PY' || { cat "$OUT/versions.txt"; echo "bench/gpu_accept.sh: the stack does not import (see above); assemble .whl/ with bench/gpu_wheels.py"; exit 3; }
import importlib, sys
print("python", sys.version.split()[0])
failed = []
# the stack, then what it takes from the image unchecked (transformers checks some of it on import)
for name in ("torch", "triton", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub", "pydantic",
             "tokenizers", "safetensors", "numpy", "matplotlib", "typing_extensions", "pandas", "pyarrow", "xxhash", "dill",
             "multiprocess", "fsspec", "click", "rich", "tqdm", "lora_sdpo"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as e:  # report every one that fails, then stop
        print(name, "FAILED:", type(e).__name__, e)
        failed.append(name)
try:  # what every manifest records; lora-sdpo is not installed here, only on PYTHONPATH
    from lora_sdpo.run import library_versions
    print("library_versions", library_versions())
except Exception as e:
    print("lora_sdpo.run.library_versions FAILED:", type(e).__name__, e)
    failed.append("library_versions")
sys.exit(1 if failed else 0)
PY
cat "$OUT/versions.txt"
echo "{\"setup_s\": $(( ($(date +%s%N) - T0) / 1000000 )).0e-3}" > "$OUT/setup.status.json"
if [ -z "$REHEARSAL" ]; then
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_accept.sh: no CUDA GPU here')" || exit 2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
else
  export LORA_SDPO_TEST_DEVICE=cpu
fi

part() {  # name seconds command...: runs it under a limit, records its wall time and exit status
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"limit_s\": $limit, \"wall_s\": $(( ($(date +%s%N) - t0) / 1000000 )).0e-3}" > "$OUT/$name.status.json"
  tail -n 5 "$OUT/$name.log"
  echo "== $name: exit $rc"
}

echo "== (a) exactness on CUDA"
part exactness "$A_S" python3 -m pytest -q -rA -s tests/test_cuda.py --junitxml "$OUT/exactness.xml" -p no:cacheprovider

echo "== (b) the quickstart on CUDA"
part quickstart "$B_S" python3 - "$WORK" "$OUT/quickstart.json" <<'PY'
import json, sys, time
from pathlib import Path
import torch
from lora_sdpo import manifest
from lora_sdpo.cli import main

work, out, results = Path(sys.argv[1]), Path(sys.argv[2]), {}
cuda = torch.cuda.is_available()  # False in a rehearsal only (the script stops earlier on a GPU machine without CUDA)
for name, extra in (("float32", []), ("bf16", ["--set", "adapter.compute_dtype=bfloat16", "--set", "training.precision=bf16"])):
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    main(["run", "recipes/quickstart.toml", "--output", str(work / f"quickstart-{name}"), *extra], standalone_mode=False)
    m = manifest.read(work / f"quickstart-{name}")
    results[name] = {"wall_s": round(time.perf_counter() - t, 1), "first_loss": [s.first_loss for s in m.steps],
                     "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None, "status": [s.status for s in m.steps]}
    print(name, results[name], flush=True)
    out.write_text(json.dumps(results, indent=1))
PY

echo "== (c) one step at Mistral-7B shapes, $LAYERS layers, $PAIRS pairs"
part step "$C_S" python3 bench/gpu_step.py --work "$WORK/step" --layers "$LAYERS" --pairs "$PAIRS" --arms pairs,trl --json "$OUT/gpu_step.json" ${REHEARSAL:+--rehearse}
rm -rf "$WORK"

python3 - "$OUT" <<'PY'
import json, math, os, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rehearsal = bool(os.environ.get("REHEARSAL"))
HERE = "not run here"  # a rehearsal's mark for what needs CUDA
status = lambda name: json.loads((out / f"{name}.status.json").read_text()) if (out / f"{name}.status.json").exists() else {}  # noqa: E731
rows = []
def row(part, what, result, detail=""):
    rows.append((part, what, result, detail))

def exited(st):
    return f"exit {st.get('rc')}" + (f" (timeout {st.get('limit_s')} s)" if st.get("rc") == 124 else "")

row("setup", "wheels installed, stack imported, library_versions()", "pass", f"{status('setup').get('setup_s', 0):.0f} s")
row("device", "nvidia-smi", HERE if rehearsal else "pass", "no GPU: a CPU rehearsal" if rehearsal else (out / "device.txt").read_text().strip()[:70])
st = status("exactness")
if (out / "exactness.xml").exists():
    for case in ET.parse(out / "exactness.xml").iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        # on the GPU nothing may skip: a skipped check is one that did not run
        result = "FAIL" if bad is not None else (HERE if rehearsal else "NOT RUN") if skip is not None else ("pass (CPU)" if rehearsal else "pass")
        detail = (bad.get("message") or "")[:70] if bad is not None else (skip.get("message") or "")[:70] if skip is not None else f"{float(case.get('time', 0)):.1f} s"
        row("a", case.get("name"), result, detail)
    if rehearsal:
        row("a", "the same checks on CUDA (float32, bf16)", HERE, "tests/test_cuda.py ran on the CPU above")
else:
    row("a", "tests/test_cuda.py", "NOT RUN", exited(st))
st = status("quickstart")
qs = json.loads((out / "quickstart.json").read_text()) if (out / "quickstart.json").exists() else {}
for name in ("float32", "bf16"):
    r = qs.get(name)
    if r:
        # ln 2 within 1e-4 in float32; in bf16 within 0.03, the bound tests/test_bf16.py states for
        # a reference pass packed differently from the first training batch
        tol = 1e-4 if name == "float32" else 0.03
        ok = all(abs(x - math.log(2)) < tol for x in r["first_loss"]) and r["status"] == ["done", "done"]
        peak = f"peak {r['peak_allocated_gib']} GiB" if r["peak_allocated_gib"] is not None else f"peak: {HERE}"
        row("b", f"quickstart {name}", ("pass (CPU)" if rehearsal else "pass") if ok else "FAIL",
            f"{r['wall_s']} s, first losses {', '.join(f'{x:.6f}' for x in r['first_loss'])}, {peak}")
    else:
        row("b", f"quickstart {name}", "NOT RUN", exited(st))
if rehearsal:
    row("b", "the quickstart on CUDA, its peak memory", HERE, "ran on the CPU above")
st = status("step")
step = json.loads((out / "gpu_step.json").read_text()) if (out / "gpu_step.json").exists() else {}
for key, label in (("lora_sdpo_pairs", "pair forward"), ("trl", "plain TRL")):
    r = step.get(key)
    if r and rehearsal:
        row("c", f"toy shapes (hidden 64) x {step.get('pairs')} pairs, {label}", "ran (CPU)",
            f"first loss {r['first_loss']:.6f}" if r.get("first_loss") is not None else f"{r.get('wall_s')} s")
        row("c", f"Mistral-7B shapes, {label}: tok/s, MFU, peak memory", HERE, "CUDA")
    elif r:
        row("c", f"{step.get('layers')} layers x {step.get('pairs')} pairs, {label}", "ran",
            f"train {r['train_tokens_per_s']} tok/s, MFU {r['mfu_train']}, ref {r['reference_tokens_per_s']} tok/s, "
            f"peak {r['peak_allocated_gib']} GiB alloc / {r['peak_reserved_gib']} reserved")
    else:
        row("c", f"Mistral-7B shapes, {label}", "NOT RUN", exited(st))
if step.get("planner_gib") is not None:
    row("c", "planner estimate (same shapes)", "-", f"{step['planner_gib']} GiB")
walls = {n: status(n).get(f"{'setup' if n == 'setup' else 'wall'}_s") for n in ("setup", "exactness", "quickstart", "step")}
w = [max(len(str(r[i])) for r in rows + [("part", "check", "result", "detail")]) for i in range(4)]
print("\n" + ((out / "device.txt").read_text().strip() if (out / "device.txt").exists() else "CPU rehearsal (REHEARSAL=1): no GPU"))
for r in [("part", "check", "result", "detail")] + rows:
    print("  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)))
print("wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items() if v is not None) + f"; total {sum(v for v in walls.values() if v):.0f}")
(out / "table.json").write_text(json.dumps({"rehearsal": rehearsal, "rows": rows, "wall_s": walls}, indent=1))
sys.exit(1 if any(r[2] in ("FAIL", "NOT RUN") for r in rows) else 0)
PY
