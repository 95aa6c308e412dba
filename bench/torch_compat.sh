#!/usr/bin/env bash
# The CPU tests that cover what bench/gpu_accept.sh runs, under another torch: the one a GPU
# machine's image holds (bench/gpu_accept.sh uses the image's torch, which is not this project's pin).
#
#   bash bench/torch_compat.sh TORCH TRITON       # e.g. 2.11.0 3.6.0; VENV=... to reuse a venv
#
# Builds a venv (default /tmp/torch-compat-TORCH) with torch==TORCH and triton==TRITON and every
# other pin of pyproject.toml, then runs, with this checkout on PYTHONPATH: tests/test_pairs.py (the
# pair forward against TRL's layout and full logits, float32 and bf16, flex without gradients),
# tests/test_cuda.py as far as a CPU runs it, tests/test_triton_head.py (TRL's Triton kernel through
# Triton's interpreter), tests/test_bf16.py, tests/test_invariants.py, tests/test_resume.py,
# tests/test_merge.py and tests/test_manifest.py; then the quickstart. PyPI's torch for Linux is a
# CUDA build: the venv takes ~4.6 GB and about a minute and a half to install here; it runs on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: bash bench/torch_compat.sh TORCH_VERSION TRITON_VERSION}
TRITON=${2:?usage: bash bench/torch_compat.sh TORCH_VERSION TRITON_VERSION}
VENV=${VENV:-/tmp/torch-compat-$TORCH}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || exit 1
  pins=$(python3 -c "import tomllib; print(' '.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith(('torch', 'triton'))))")
  "$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" || exit 1
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $pins pytest pytest-xdist || exit 1
fi
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 LORA_SDPO_TEST_DEVICE=cpu TQDM_DISABLE=1
"$VENV/bin/python" -c "import torch, triton, transformers, trl; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_pairs.py tests/test_cuda.py tests/test_triton_head.py \
  tests/test_bf16.py tests/test_invariants.py tests/test_resume.py tests/test_merge.py tests/test_manifest.py 2>&1 | tail -n 8
tests=${PIPESTATUS[0]}
out=$(mktemp -d)
"$VENV/bin/python" -m lora_sdpo run recipes/quickstart.toml --output "$out/run" 2>&1 | grep -E "done:|^error" | sed 's/.*\r//'
quickstart=${PIPESTATUS[0]}
rm -rf "$out"
echo "torch compat | torch $TORCH, triton $TRITON | tests exit $tests | quickstart exit $quickstart"
[ "$tests" = 0 ] && [ "$quickstart" = 0 ]
