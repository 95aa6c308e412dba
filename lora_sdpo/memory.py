"""Host memory that a run has freed but the process still holds, given back.

Three things keep a CPU run's resident memory above what its tensors need (bench/quickstart_memory.py,
measured on the quickstart; BENCHMARKS.md "The quickstart's memory"):

- glibc keeps freed heap memory in its arenas. Between phases (a model freed, the next one
  loaded) and after every optimizer update on the CPU, `trim()` hands the free pages back
  (`malloc_trim(0)`); without it the floor of the RSS rose with every update and every step.
- oneDNN, which runs the CPU's bf16 matmuls (TRL keeps a QLoRA adapter in bf16, so every LoRA
  matmul is one), keeps each compiled kernel in a cache of 1024 by default, keyed by shape. The
  pair forward's packs have a new length every batch, so nearly every update adds kernels that
  are never used again (348 shapes in the quickstart). `set_native_defaults()` caps the cache at
  ONEDNN_CACHE unless the environment already sets ONEDNN_PRIMITIVE_CACHE_CAPACITY.
- Arrow (under `datasets`) allocates from its own pool (mimalloc), which keeps what the tokenising
  maps freed. `set_native_defaults()` points Arrow at the system allocator
  (ARROW_DEFAULT_MEMORY_POOL=system, unless the environment sets it), whose free pages `trim()`
  returns: ~30 MB off the quickstart's peak.

oneDNN reads its variable when it first builds a kernel and Arrow its own when it is first imported,
so the command line calls `set_native_defaults()` before any work.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os

# Kernels oneDNN keeps: enough for the layers of one batch to reuse their LoRA shapes (4 measured
# the same quickstart peak as 16: BENCHMARKS.md).
ONEDNN_CACHE = 16


def set_native_defaults() -> None:
    """Bound oneDNN's kernel cache and send Arrow to the system allocator, unless the environment says otherwise."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE))
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def trim() -> None:
    """Hand glibc's free heap pages back to the system (nothing with another C library)."""
    f = _malloc_trim()
    if f is not None:
        f(0)


def release() -> None:
    """Return freed models' memory now, before the next model is loaded or training starts."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
