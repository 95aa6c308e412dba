#!/usr/bin/env bash
# The GPU acceptance, rehearsed on this CPU machine: the device call's exact command
# (`bash bench/gpu_accept.sh`) in a mirror of the GPU image, with only the CUDA work skipped.
#
#   bash bench/gpu_rehearsal.sh          # VENV (default /tmp/lora-sdpo-image, reused if there), OUT (default /tmp/gpu-rehearsal)
#
# 1. the image's mirror: a Python 3.12 venv (the image: 3.12.3; here pyenv's 3.12, numpy 2.5.2 needs
#    it) with requirements/gpu_image.txt (torch 2.11.0 as PyPI's CUDA build, ~4.6 GB, run on the
#    CPU; transformers 5.17.0, ...), and NOT the project, nor trl, bitsandbytes, datasets, pydantic;
# 2. .whl/ assembled by bench/gpu_wheels.py (for Python 3.12, CUDA 13), and the budgets of one
#    device call checked: the tracked files plus .whl/ within 64 MiB, the command within 2,000
#    characters, the parts' time limits plus the wheel install and import check within 8 minutes;
# 3. `bash bench/gpu_accept.sh` with the mirror's python3 first on PATH and REHEARSAL=1, in a copy of
#    what a device call carries (the files git tracks or would add, and .whl/): the wheels installed
#    with `pip install --no-index --no-deps --target`, the checkout on PYTHONPATH, nothing installed;
# 4. the table checked: every part (setup, device, a, b, c) has its rows, nothing failed or went
#    unrun, and every CUDA-only row says "not run here".
# Exits 0 only if all of that holds. Its logs, JSON and table are under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/lora-sdpo-image}
OUT=${OUT:-/tmp/gpu-rehearsal}
COMMAND='bash bench/gpu_accept.sh'  # what the device call runs (its $OUT is set there)
BUDGET_S=480
T0=$(date +%s)
stamp() { echo "== rehearsal: $1 ($(( $(date +%s) - T0 )) s)"; }

if [ ! -x "$VENV/bin/python3" ]; then
  . bench/python312.sh
  "$PY" -m venv "$VENV" || exit 1
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements/gpu_image.txt || exit 1
  # typer's newest (transformers needs typer) pulls in pydantic, which the image lacks: take it out again
  "$VENV/bin/pip" uninstall -q -y pydantic pydantic-core annotated-types typing-inspection || exit 1
  stamp "image mirror built with $PY"
fi
for absent in trl bitsandbytes datasets pydantic lora-sdpo; do
  if "$VENV/bin/pip" show -q "$absent" >/dev/null 2>&1; then echo "bench/gpu_rehearsal.sh: $VENV has $absent, which the image lacks"; exit 1; fi
done

"$VENV/bin/python3" bench/gpu_wheels.py --python 3.12 --cuda 13 --budget-mib 64 | tail -n 2 || exit 1
stamp ".whl/ assembled"

rm -rf "$OUT" && mkdir -p "$OUT"
SITE=$(mktemp -d)
# what a device call carries: the tracked and the untracked-not-ignored files, and .whl/ (no .venv,
# no *.egg-info that an editable install leaves here)
mkdir "$SITE/tree"
git ls-files -co --exclude-standard -z | xargs -0 cp -P --parents -t "$SITE/tree" 2>/dev/null
cp -r .whl "$SITE/tree/.whl"
# the parts' limits are the GPU's; on a CPU they get 15 minutes each (the budget check below reads the GPU's)
env -u PYTHONPATH PATH="$VENV/bin:$PATH" OUT="$OUT" SITE="$SITE/site" WORK="$SITE/work" REHEARSAL=1 A_S=900 B_S=900 C_S=900 \
  bash -c "cd '$SITE/tree' && $COMMAND" 2>&1 | tee "$OUT/rehearsal.log"
rc=${PIPESTATUS[0]}
rm -rf "$SITE"
stamp "$COMMAND exit $rc"

"$VENV/bin/python3" - "$OUT" "$COMMAND" "$BUDGET_S" "$rc" <<'PY'
import json, re, sys
from pathlib import Path

out, command, budget, rc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
problems = [] if rc == 0 else [f"bench/gpu_accept.sh exited {rc}"]
table = json.loads((out / "table.json").read_text()) if (out / "table.json").exists() else {"rows": [], "wall_s": {}}
rows = table["rows"]
for part in ("setup", "device", "a", "b", "c"):
    if not any(r[0] == part for r in rows):
        problems.append(f"part {part}: no row in the table")
for part, what, result, _ in rows:
    if result in ("FAIL", "NOT RUN"):
        problems.append(f"{part} {what}: {result}")
    cuda_only = part == "device" or "CUDA" in what or "Mistral-7B" in what or "peak" in what
    if cuda_only and result != "not run here":
        problems.append(f"{part} {what}: a CUDA-only row marked {result!r}, not 'not run here'")
# the budgets of one device call
script = Path("bench/gpu_accept.sh").read_text()
limits = {k: int(re.search(rf"^{k}=\$\{{{k}:-(\d+)\}}", script, re.M).group(1)) for k in ("A_S", "B_S", "C_S")}
setup = table["wall_s"].get("setup") or 0
total = sum(limits.values()) + setup
if len(command) > 2000:
    problems.append(f"the command has {len(command)} characters, over 2,000")
if total > budget:
    problems.append(f"time limits {limits} + setup {setup:.0f} s = {total:.0f} s, over {budget} s")
print(f"rehearsal | {len(rows)} rows, parts {sorted({r[0] for r in rows})} | command {len(command)} chars | "
      f"worst case on the GPU: limits {sum(limits.values())} s + setup {setup:.0f} s (here) = {total:.0f} of {budget} s")
print("\n".join(problems) if problems else "rehearsal | passed: every part's plumbing got through; CUDA rows are marked 'not run here'")
sys.exit(1 if problems else 0)
PY
