"""The launcher around the processes: starting them through accelerate on one machine or several,
what each leaves for it (how it ended), a heartbeat per process to name the one that is gone, and
the shared-filesystem contract of a run over several machines.

Each `lora-sdpo run --num-processes N [--num-machines M ...]` runs `accelerate launch` on its
machine; the processes it starts leave `rank-R.started/.finished/.error` in a folder it passes in
the environment, so that it can end with one line naming the process that failed first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .distributed import BEAT_KEY, BEAT_SECONDS, ERROR_DIR_ENV, broadcast, gather_object, store_client, world
from .errors import RunError

# ---------------------------------------------------------------------------------------------
# Launching


@dataclass(frozen=True)
class Machines:
    """Where this machine stands in a run over several (--num-machines M --machine-rank R ...)."""

    count: int = 1
    rank: int = 0
    main_ip: str | None = None
    main_port: int | None = None

    def check(self) -> None:
        if self.count == 1:
            return
        missing = [o for o, v in (("--machine-rank", self.rank), ("--main-process-ip", self.main_ip)) if v is None]
        if missing:
            raise RunError(
                f"--num-machines {self.count}: also give {' and '.join(missing)} (this machine's rank, 0 to "
                f"{self.count - 1}, and the address of machine 0 that every machine reaches); run the same command "
                "on every machine with its own --machine-rank"
            )
        if not 0 <= self.rank < self.count:
            raise RunError(f"--machine-rank {self.rank}: must be 0 to {self.count - 1} with --num-machines {self.count}")


def launch_command(argv: list[str], processes: int, port: int | None = None, machines: Machines = Machines()) -> list[str]:
    """The `accelerate launch` command that runs `lora_sdpo` with `argv` in N processes (on each machine)."""
    where = (["--num_machines", "1", "--main_process_port", str(port or _free_port())] if machines.count == 1 else [
        "--num_machines", str(machines.count), "--machine_rank", str(machines.rank),
        "--main_process_ip", machines.main_ip, "--main_process_port", str(machines.main_port or DEFAULT_PORT)])
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes * machines.count), *where,
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "lora_sdpo", *argv,
    ]  # fmt: skip


DEFAULT_PORT = 29500  # torchrun's and accelerate's


def launch(argv: list[str], processes: int, echo=print, machines: Machines = Machines()) -> int:
    """Run `lora_sdpo argv` in N processes through accelerate; return the exit status to use.

    The processes' own output goes to the terminal. When one fails, the launcher stops the others
    on this machine (and the other machines' processes lose their connection to them and stop);
    then one line names the process that failed first and its message (each process leaves it in
    a folder passed in the environment), after the launcher's own summary.
    """
    size = processes * machines.count
    with tempfile.TemporaryDirectory(prefix="lora-sdpo-errors-") as errors:
        env = {**os.environ, ERROR_DIR_ENV: errors}
        if "OMP_NUM_THREADS" not in env and not _has_gpu():
            # torchrun gives each process 1 thread; on CPUs share the cores instead
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        code = subprocess.run(launch_command(argv, processes, machines=machines), env=env).returncode
        if code == 0:
            return 0
        folder = Path(errors)
        messages = [json.loads(f.read_text()) for f in folder.glob("rank-*.error")]
        # A process that lost its connection names the processes whose heartbeat stopped.
        lost = [m for m in messages if m.get("lost")]
        if lost:
            echo(f"error: the run stopped: {min(lost, key=lambda m: m['time'])['message']}")
        # A process that started and neither finished nor left a message was killed (a signal, the
        # OOM killer); the others' errors are then mostly their lost connection to it.
        silent = sorted(int(f.stem.split("-")[1]) for f in folder.glob("rank-*.started")
                        if not (folder / f"{f.stem}.error").exists() and not (folder / f"{f.stem}.finished").exists())
        if silent or not messages:
            who = (f"process{'es' if len(silent) > 1 else ''} {', '.join(map(str, silent))} of {size}" if silent
                   else f"one of its {size} processes")
            where = f" on this machine (machine {machines.rank})" if machines.count > 1 else ""
            echo(f"error: the run stopped: {who}{where} ended without a message (killed, or stopped by the launcher "
                 "when another one ended); accelerate's summary above names the first (Root Cause) and its exit code. "
                 f"Run the same command again{' on every machine' if machines.count > 1 else ''} to resume.")
            return 1
        if lost:
            return 1
        first = min(messages, key=lambda m: m["time"])  # the others mostly lost their connection to it
        echo(f"error: process {first['rank']} of {size} failed first: {first['message']}")
        return first["status"]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_connection_error(e: BaseException) -> bool:
    """An error of the process group's transport (gloo, nccl): a peer went away."""
    import torch.distributed as dist

    if not world().active:
        return False
    text = str(e)
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "Connection reset", "Connection closed", "NCCL", "Broken pipe")))


def lost_peer_message(watch_s: float = 4 * BEAT_SECONDS + 1) -> str:
    """Which process or machine is gone, for a process whose collective just failed: the peers
    whose heartbeat does not move while this one watches, or machine 0 when its launcher's store
    itself is gone. Said in one line, with what to do."""
    w = world()
    per_machine = max(1, w.size // max(1, w.machines))
    again = "run the same command again" + (" on every machine" if w.machines > 1 else "") + \
        " to resume from the last checkpoint"
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:  # not a torch elastic launch
        return f"process {w.rank} of {w.size} lost its connection to another process; {again}"
    try:
        store = store_client(5)
        before = [int(store.add(BEAT_KEY.format(r), 0)) for r in range(w.size)]
        time.sleep(watch_s)
        after = [int(store.add(BEAT_KEY.format(r), 0)) for r in range(w.size)]
    except Exception:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        return (f"process {w.rank} of {w.size} lost its connection to the others, and machine 0's launcher ({where}) "
                f"no longer answers: machine 0 (process 0{f' to {per_machine - 1}' if per_machine > 1 else ''}) "
                f"stopped or became unreachable; {again}")
    dead = [r for r in range(w.size) if r != w.rank and after[r] == before[r]]
    if not dead:
        return f"process {w.rank} of {w.size} lost its connection to another process; {again}"
    machines = sorted({r // per_machine for r in dead})
    names = ", ".join(map(str, dead))
    on = (f" (machine{'s' if len(machines) > 1 else ''} {', '.join(map(str, machines))})" if w.machines > 1 else "")
    return (f"process {w.rank} of {w.size} lost its connection to process{'es' if len(dead) > 1 else ''} {names}{on}, "
            f"which stopped or became unreachable; {again}")


# ---------------------------------------------------------------------------------------------
# The shared filesystem


def check_shared_dir(root: Path) -> None:
    """Every process proves that it sees the run directory the main process sees: the main process
    writes a token there and each process reads it back. Otherwise every process raises the same
    error naming the paths. Nothing is left behind either way (the token, and the folders made for
    it, are removed)."""
    import secrets

    w = world()
    if not w.active:
        return
    root = Path(root)
    token, made = None, []
    name = None
    if w.main:
        with contextlib.suppress(OSError):
            made = [d for d in (root, *root.parents) if not d.exists()]
            root.mkdir(parents=True, exist_ok=True)
            token = root / f".lora-sdpo-shared-{secrets.token_hex(8)}"
            token.write_text(token.name)
            name = token.name
    name = broadcast(name)
    try:
        seen = name is not None and (root / name).read_text() == name
    except OSError:
        seen = False
    views = gather_object({"rank": w.rank, "machine": w.machine, "host": socket.gethostname(), "path": str(root), "seen": seen})
    if w.main:
        with contextlib.suppress(OSError):
            if token is not None:
                token.unlink()
            for d in made:  # deepest first; only folders that are still empty
                d.rmdir()
    blind = [v for v in views if not v["seen"]]
    if blind:
        main = views[0]
        who = "; ".join(f"process {v['rank']} (machine {v['machine']}, host {v['host']}) did not find it in {v['path']}"
                        for v in blind[:4]) + (f"; ... {len(blind) - 4} more" if len(blind) > 4 else "")
        raise RunError(
            f"run directory {main['path']} is not shared by every machine: process 0 (machine 0, host {main['host']}) "
            f"wrote a token into it, and {who}. The run directory (and the model S) must be on a filesystem that "
            "every machine mounts (NFS, Lustre, ...): give every machine the same --output there; nothing was written"
        )
