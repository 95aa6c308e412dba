# Sourced by bench/oldest_stack.sh and bench/gpu_rehearsal.sh: sets PY to a Python 3.12 interpreter
# (the GPU image's minor version; numpy 2.5.2 needs it), from PATH or pyenv, or exits 2 saying so.
PY=""
for c in python3.12 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
  if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PY=$c; break; fi
done
[ -n "$PY" ] || { echo "$0: no Python 3.12 here (the GPU image's minor version; numpy 2.5.2 needs it)"; exit 2; }
