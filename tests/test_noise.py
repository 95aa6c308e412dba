"""bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line is dropped at its
source (lora_sdpo/noise.py), and only that line: its other warnings still print."""

from __future__ import annotations

import importlib
import logging
import sys

import bitsandbytes._ops
import bitsandbytes.functional

from lora_sdpo import noise

LINE = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"


def _run_bnb_kernel_lookup(monkeypatch):
    # bitsandbytes looks the kernel up when it imports its CPU ops on a CPU with AVX512-BF16. This
    # machine may lack it: import the real module again with the CPU check answering yes and kernel
    # registration made a no-op (the process keeps its kernels), so its real code logs the real line.
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bitsandbytes._ops, "register_kernel", lambda *a, **k: (lambda f: f))
    monkeypatch.delitem(sys.modules, "bitsandbytes.backends.cpu.ops")
    importlib.import_module("bitsandbytes.backends.cpu.ops")


def test_missing_kernels_line_is_dropped_and_other_warnings_stay(monkeypatch, caplog):
    log = logging.getLogger(noise.BNB_CPU_OPS_LOGGER)
    assert any(isinstance(f, noise._MissingKernelsPackage) for f in log.filters)  # importing lora_sdpo installed it

    monkeypatch.setattr(log, "filters", [])  # without the filter, bitsandbytes prints the line
    with caplog.at_level(logging.WARNING):
        _run_bnb_kernel_lookup(monkeypatch)
    assert LINE in caplog.text
    caplog.clear()

    monkeypatch.undo()
    noise.install()
    with caplog.at_level(logging.WARNING):
        _run_bnb_kernel_lookup(monkeypatch)
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", RuntimeError("Hub unreachable"))
        log.warning("a real bitsandbytes warning")
    assert LINE not in caplog.text
    assert "Hub unreachable" in caplog.text  # another cause of the same failure is still reported
    assert "a real bitsandbytes warning" in caplog.text
