"""Named crash points for the resume tests: `LORA_SDPO_FAULT=step1:merge` makes a run SIGKILL
itself at that point, exactly as a power cut or an OOM killer would, so the tests can prove that a
run killed there resumes to the uninterrupted result. Unset (always, for users), it does nothing.

Points, by phase of step.py: step{t}:reference (reference log-probs computed, not yet saved),
step{t}:train:{k} (after the trainer checkpoint of optimizer step k is sealed), step{t}:adapter (A_t
saved, the record not yet written), step{t}:merge (inside the M_t write, after its first shard),
step{t}:retention (retention measured, not yet recorded), step{t}:diagnostics (the gamma rows
computed, the step not yet recorded as done), step{t}:done (between steps).
"""

from __future__ import annotations

import os
import signal

_step = 0


def set_step(index: int) -> None:
    global _step
    _step = index


def point(name: str) -> None:
    wanted = os.environ.get("LORA_SDPO_FAULT")
    if wanted and wanted == f"step{_step}:{name}":
        os.kill(os.getpid(), signal.SIGKILL)
