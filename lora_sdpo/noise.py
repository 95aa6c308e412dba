"""Library lines that say nothing to a lora-sdpo user, silenced where they are emitted.

bitsandbytes 0.50, on a CPU with AVX512-BF16, tries at import to fetch an optional CPU kernel
from the Hub through the `kernels` package and logs a warning when that package is not installed:
"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'". The
built-in kernels run instead (every NF4 figure of this project was measured with them), and
offline nothing could be fetched anyway, so every command started with that line. The filter below
drops exactly that record, and only when the cause is the missing `kernels` package: any other
failure to load the kernel, and every other bitsandbytes warning, is still printed.
"""

from __future__ import annotations

import logging

BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNEL_MISSING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _MissingKernelsPackage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_KERNEL_MISSING):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (isinstance(cause, ModuleNotFoundError) and cause.name == "kernels")


def install() -> None:
    """Attach the filter to bitsandbytes' CPU-ops logger (before bitsandbytes is imported; idempotent)."""
    log = logging.getLogger(BNB_CPU_OPS_LOGGER)
    if not any(isinstance(f, _MissingKernelsPackage) for f in log.filters):
        log.addFilter(_MissingKernelsPackage())
