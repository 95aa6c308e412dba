"""The tests' CLI runs as forks of one process that has already imported the stack.

A `python -m lora_sdpo ...` process spends about 13 s of CPU importing torch, transformers, PEFT,
bitsandbytes and TRL before it does anything, and the suite starts some 40 of them. This server
imports all of lora_sdpo once (nothing else: no test code runs in it), then forks one child per
request. Each child is a new process, as `python -m lora_sdpo ARGS` would be, except that its
imports are already done: it takes the request's environment, working directory, argv and the
pipes for its stdout and stderr, runs lora_sdpo's __main__, and exits through the interpreter (so
atexit handlers run and an uncaught exception prints its traceback and exits 1, as usual). The
tests talk to it through `ForkedProcess` (conftest.cli and cli_popen); the child's pid is real, so
a test can SIGKILL it like any process, and the server reports its exit status.

What a fork cannot reproduce is anything a library reads from the environment at import time
(thread counts, TQDM_*, HF_HUB_OFFLINE, LORA_SDPO_FLEX, glibc's MALLOC_*): the server is started
with the environment the tests' CLI calls get (conftest.cli_env), and a call that changes any
variable outside RUNTIME_ENV runs as a plain subprocess instead (conftest decides). A child's
environment is the call's, plus what the server's own imports added to theirs (as a new process's
imports would). LORA_SDPO_TEST_FORK=0 runs every CLI call as a subprocess.

Protocol (one Unix-socket connection per child): the client sends one JSON line with argv, env and
cwd, and with it (SCM_RIGHTS) the write ends of its stdout and stderr pipes; the server answers
"pid N", and "exit CODE CPU_SECONDS" when the child has ended (CODE as subprocess's returncode:
negative for a signal; CPU_SECONDS the child's and its own children's, from wait4).
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys

# Variables that lora_sdpo reads when a command runs, not when it is imported: a request may set them.
RUNTIME_ENV = frozenset({"HF_TOKEN", "LORA_SDPO_FAULT", "PYTEST_CURRENT_TEST"})


def _preload() -> None:
    import importlib
    import pkgutil

    import lora_sdpo

    for m in pkgutil.iter_modules(lora_sdpo.__path__):
        if m.name != "__main__":
            importlib.import_module(f"lora_sdpo.{m.name}")
    import matplotlib.pyplot  # noqa: F401  (the report's plots)


def _child(conn: socket.socket, listener: socket.socket, request: dict, fds: list[int], added: dict) -> None:
    """In the forked child: become `python -m lora_sdpo ARGV` and run it; never returns."""
    import runpy

    listener.close()
    conn.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1] if len(fds) > 1 else fds[0], 2)
    for fd in {null, *fds}:
        os.close(fd)
    os.environ.clear()
    os.environ.update({**added, **request["env"]})
    os.chdir(request["cwd"])
    main = os.path.join(os.path.dirname(sys.modules["lora_sdpo"].__file__), "__main__.py")
    sys.argv = [main, *request["argv"]]
    runpy.run_module("lora_sdpo", run_name="__main__", alter_sys=True)
    sys.exit(0)  # unwinds to the interpreter's exit: atexit handlers, flushed streams


def serve(path: str) -> None:
    import gc

    start = dict(os.environ)
    _preload()
    # what importing the stack set (e.g. threadpoolctl's KMP_DUPLICATE_LIB_OK): a new process has it too
    added = {k: v for k, v in os.environ.items() if k not in start}
    # Out of the collector's sight: a child's collections (and its exit) would otherwise touch every
    # imported object and copy the pages it shares with us (exit alone took 4.2 s instead of 0.9 s).
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    sys.stderr.flush()
    children: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in ready and not sys.stdin.readline():
            break  # the test session closed our stdin: it has ended
        if listener in ready:
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
            buf = msg
            while not buf.endswith(b"\n"):
                more = conn.recv(1 << 20)
                if not more:
                    break
                buf += more
            pid = os.fork()
            if pid == 0:
                _child(conn, listener, json.loads(buf), fds, added)
            for fd in fds:
                os.close(fd)
            conn.sendall(f"pid {pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                cpu = usage.ru_utime + usage.ru_stime
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)} {cpu:.3f}\n".encode())
                except OSError:
                    pass  # the client went away
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])


# ---------------------------------------------------------------------------------------------
# The tests' side


class Server:
    """The server process of one test session, started at once so that its imports overlap the
    first tests; `start` waits for it to be ready."""

    def __init__(self, env: dict[str, str]):
        import subprocess
        import tempfile

        self.env = dict(env)
        self.path = os.path.join(tempfile.mkdtemp(prefix="lora-sdpo-cli-"), "cli.sock")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=self.env, text=True)
        self.ready = False
        self.cpu = 0.0  # CPU seconds of the children that have ended
        self.forked, self.declined = 0, []  # calls forked; the variables of each call that was not

    def accepts(self, env: dict[str, str]) -> bool:
        """Whether a child can run with `env`: it differs from ours only in RUNTIME_ENV."""
        keys = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)} - RUNTIME_ENV
        if keys:
            self.declined.append(sorted(keys))
        else:
            self.forked += 1
        return not keys

    def start(self, argv: list[str], env: dict[str, str], stdout: int, stderr: int | None) -> "ForkedProcess":
        if not self.ready:
            # Imports may print first (transformers prints a line when WANDB_MODE=offline): skip to "ready".
            line = self.proc.stdout.readline()
            while line and line.strip() != "ready":
                line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the tests' CLI server did not start (exit {self.proc.wait()})")
            self.ready = True
        return ForkedProcess(self, argv, env, stdout, stderr)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


class ForkedProcess:
    """A forked `python -m lora_sdpo ARGV` with what tests use of subprocess.Popen: pid, stdout
    and stderr (text, when they are pipes), poll, wait, kill, returncode."""

    def __init__(self, server: Server, argv, env, stdout: int, stderr: int | None):
        self.server, self.returncode, self.cpu = server, None, 0.0
        self._buf = b""
        reads, sends = [], []
        for target in (stdout, stderr):
            if target is None:  # stderr into stdout
                continue
            if target == -1:  # a pipe
                r, w = os.pipe()
                reads.append(r)
            else:
                r, w = None, os.open(os.devnull, os.O_WRONLY)
                reads.append(None)
            sends.append(w)
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(server.path)
        request = json.dumps({"argv": list(argv), "env": env, "cwd": os.getcwd()}).encode() + b"\n"
        socket.send_fds(self.conn, [request], sends)
        for w in sends:
            os.close(w)
        self.pid = int(self._line().split()[1])
        self.stdout = open(reads[0], encoding="utf-8", errors="replace") if reads[0] is not None else None
        self.stderr = (open(reads[1], encoding="utf-8", errors="replace")
                       if len(reads) > 1 and reads[1] is not None else None)

    def _line(self) -> str:
        while b"\n" not in self._buf:
            more = self.conn.recv(4096)
            if not more:
                raise RuntimeError("the tests' CLI server closed the connection")
            self._buf += more
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _ended(self) -> None:
        _, code, cpu = self._line().split()
        self.returncode, self.cpu = int(code), float(cpu)
        self.server.cpu += self.cpu
        self.conn.close()

    def poll(self):
        if self.returncode is None and (b"\n" in self._buf or select.select([self.conn], [], [], 0)[0]):
            self._ended()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if self.returncode is None:
            if b"\n" not in self._buf and not select.select([self.conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(["lora-sdpo", "(forked)"], timeout)
            self._ended()
        return self.returncode

    def kill(self) -> None:
        import signal

        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
