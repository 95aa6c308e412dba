"""lora_sdpo/memory.py: what the command line sets for the CPU's native allocators, and what it leaves to the user."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("from lora_sdpo.memory import set_native_defaults; set_native_defaults(); import os, pyarrow; "
         "print(pyarrow.default_memory_pool().backend_name, os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")


def _probe(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True).stdout.split()


def test_arrow_uses_the_system_allocator_and_onednn_a_bounded_cache_by_default():
    assert _probe() == ["system", "16"]


def test_the_users_environment_wins():
    assert _probe(ARROW_DEFAULT_MEMORY_POOL="mimalloc", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == ["mimalloc", "1024"]
