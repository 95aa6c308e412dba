"""Shared fixtures: the shipped pico model, short real pairs, and one real 2-step run per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# One CPU thread for this process and every CLI run it starts (they inherit the environment), set
# before torch is imported. The tests' models are tiny: with two threads an NF4 forward spends most of
# its time in OpenMP's hand-offs (a two-step run of the shared fixture took 4x the CPU time with two
# threads on this 2-core machine), and the pytest process and a CLI run would compete for the cores.
# LORA_SDPO_TEST_THREADS sets another count. Results do not depend on it: runs the tests compare
# (a resumed run and the uninterrupted one, lora-sdpo and TRL by hand) run with the same count.
os.environ["OMP_NUM_THREADS"] = os.environ.get("LORA_SDPO_TEST_THREADS", "1")
os.environ["MKL_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]

import cli_server  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "pico-llama-phi3"
ORCA = ROOT / "data" / "orca_dpo_pairs" / "validation.jsonl"
ULTRA = ROOT / "data" / "ultrafeedback" / "train_clean.jsonl"

# The tests' one recipe template (recipe_toml). Small enough for the CPU: short real pairs, 3
# optimizer updates per step, float32 compute so that the invariants can be checked to 1e-4 and better.
TEST_SETTINGS = """
[run]
name = "test"
seed = 7
checkpoint_every = 1

[training]
beta = 0.1
learning_rate = 2e-3
lr_scheduler_type = "constant"
warmup_ratio = 0.0
num_train_epochs = 1
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
max_length = 128
optim = "adamw_torch"
gradient_checkpointing = false
precision = "fp32"

[retention]
sample_size = 8

[diagnostics]
gamma_sample = 4
"""
# For recipes that are refused before training: the tests' length and precision, the rest defaults.
SHORT_SETTINGS = """
[training]
max_length = 128
precision = "fp32"
"""


def recipe_toml(*sources, model=MODEL, adapter: str | None = "cpu-qlora-r16", settings: str = TEST_SETTINGS,
                extra: str = "", last_source: str = "") -> str:
    """The tests' recipe: `adapter` (a preset; None: the default), the model, `settings` (tables),
    `extra` (TOML after them, before the steps: keys of the last settings table, or whole tables),
    then one step per source file; `last_source` is TOML for the last source's table (e.g. columns)."""
    head = f'adapter = "{adapter}"\n' if adapter else ""
    steps = "".join(f'\n[[steps]]\n[[steps.sources]]\npath = "{src}"\n' for src in sources)
    return f'{head}\n[model]\npath = "{model}"\n{settings}{extra}{steps}{last_source and last_source + chr(10)}'


def short_rows(path: Path, n: int, max_prompt_tokens: int = 64, tokenizer=None) -> list[dict]:
    """The first n good rows of a shipped file whose prompt (with `tokenizer`'s template; default the pico
    model's) leaves room in the tests' max_length."""
    from transformers import AutoTokenizer

    from lora_sdpo.data import normalise, token_lengths

    tok = tokenizer or AutoTokenizer.from_pretrained(str(MODEL))
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        _, pair, problem = normalise(r)
        if problem is None and token_lengths([pair], tok)[0][0] <= max_prompt_tokens:
            out.append(r)
            if len(out) == n:
                break
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def merge_by_formula(base: Path, adapter: Path) -> tuple[dict, int]:
    """What M_t must be, recomputed from the saved files alone: every tensor of `base` plus (alpha/r) B @ A
    in float32 where the adapter has a LoRA pair; and how many tensors the adapter changes."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(adapter / "adapter_model.safetensors")
    expected, changed = {}, 0
    for name, w in all_tensors(base).items():
        a_key = "base_model.model." + name.removesuffix(".weight") + ".lora_A.weight"
        expected[name] = w.float()
        if a_key in lora:
            expected[name] = expected[name] + scale * (lora[a_key.replace("lora_A", "lora_B")].float() @ lora[a_key].float())
            changed += 1
    return expected, changed


def all_tensors(folder: Path) -> dict:
    """Every tensor of a safetensors model folder, read with safetensors alone (independent of lora-sdpo's shards.py)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(folder / f, framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


# Independent of the pipeline: transformers + bitsandbytes directly, full logits, log_softmax.
def nf4(path):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.float32).eval()
    # bitsandbytes would repack these layers for its AVX512-BF16 inference kernel on the first
    # no-grad pass (bf16 scales, no autograd); keep the standard NF4 kernel, as lora-sdpo does.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def completion_logp(model, tok, prompt, completion, max_length):
    """Summed log p(completion | prompt) with full logits: chat template, keep the first max_length tokens."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(p)] == p
    full = full[:max_length]
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[len(p) - 1 :].sum())



@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as `lora-sdpo fetch smollm2` writes it (a real model; tests marked realmodel)."""
    from lora_sdpo.zoo import is_fetched, model_dir

    if not is_fetched("smollm2"):
        pytest.fail(f"SmolLM2 is not fetched at {model_dir('smollm2')}: run `lora-sdpo fetch smollm2` first (.ci/run does)")
    return model_dir("smollm2")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "orca.jsonl", short_rows(ORCA, 12))
    write_jsonl(d / "ultra.jsonl", short_rows(ULTRA, 12))
    return d


def write_recipe(folder: Path, data_dir: Path, steps=("orca.jsonl", "ultra.jsonl"), extra: str = "") -> Path:
    """A recipe over the shipped model; `extra` is TOML placed before the steps (tables or keys)."""
    text = recipe_toml(*(data_dir / s for s in steps), extra=extra)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


# Every CLI call of the tests runs with this fake token in HF_TOKEN; test_secrets checks that it
# never reaches an output or a file.
FAKE_TOKEN = "hf_lorasdpoFAKEtoken0123456789abcdefXYZ"
CLI_OUTPUTS: list[str] = []


# The environment of every CLI call: this process's as the session started, not as it is later,
# when the libraries the tests use have set variables of their own in it (threadpoolctl's
# KMP_DUPLICATE_LIB_OK, inductor's _TORCHINDUCTOR_*, HF_XET_*), which a user's shell would not have.
_SESSION_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_TOKEN": FAKE_TOKEN}


def cli_env(**extra: str) -> dict:
    """The environment of a CLI call: the session's (above), with `extra` set."""
    return {**_SESSION_ENV, **extra}


# CLI runs are forks of one server that has imported the stack once (cli_server.py), unless
# LORA_SDPO_TEST_FORK=0 or a call changes the environment a library reads at import time.
_SERVER = None if os.environ.get("LORA_SDPO_TEST_FORK") == "0" else cli_server.Server(cli_env())


def cli_popen(*args: str, env: dict | None = None, output: bool = True):
    """`python -m lora_sdpo ARGS` started, not waited for: stdout and stderr in one text pipe
    (`.stdout`), or both to /dev/null (output=False). A subprocess.Popen, or a forked process with
    the same pid/stdout/poll/wait/kill."""
    full = cli_env(**(env or {}))
    if _SERVER is not None and _SERVER.accepts(full):
        return _SERVER.start(list(args), full, stdout=-1 if output else subprocess.DEVNULL, stderr=None)
    where = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "lora_sdpo", *args], stdout=where, stderr=subprocess.STDOUT,
                            text=True, env=full)


def _forked_run(args, full: dict, timeout: int) -> subprocess.CompletedProcess:
    import threading

    proc = _SERVER.start(list(args), full, stdout=-1, stderr=-1)
    texts = {}
    readers = [threading.Thread(target=lambda name=name, f=f: texts.__setitem__(name, f.read()), daemon=True)
               for name, f in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    for r in readers:
        r.join()
    proc.stdout.close()
    proc.stderr.close()
    return subprocess.CompletedProcess([sys.executable, "-m", "lora_sdpo", *args], proc.returncode, texts["out"], texts["err"])


def cli(*args: str, check: bool = True, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    full = cli_env(**(env or {}))
    if _SERVER is not None and _SERVER.accepts(full):
        proc = _forked_run(args, full, timeout)
    else:
        proc = subprocess.run([sys.executable, "-m", "lora_sdpo", *args], capture_output=True, text=True,
                              timeout=timeout, env=full)
    CLI_OUTPUTS.extend((proc.stdout, proc.stderr))
    if check and proc.returncode != 0:
        raise AssertionError(f"lora-sdpo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def pytest_sessionfinish(session, exitstatus):
    if _SERVER is not None:
        _SERVER.close()


def cli_here(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lora-sdpo ARGS` inside this process (click's runner), answered like cli(): for commands that
    train nothing (plan, report, gamma), which as a subprocess would pay the stack's import again
    (about 7 s of CPU a call). The same environment as cli() (the fake token included) while it
    runs; its output joins CLI_OUTPUTS; an exception that escapes the command is written to stderr
    as the interpreter would, so that "Traceback" in stderr still means one."""
    import traceback

    from click.testing import CliRunner

    from lora_sdpo.cli import main

    result = CliRunner().invoke(main, list(args), env={"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_TOKEN": FAKE_TOKEN, **(env or {})})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    proc = subprocess.CompletedProcess(["lora-sdpo", *args], result.exit_code, result.stdout, stderr)
    CLI_OUTPUTS.extend((proc.stdout, proc.stderr))
    if check and proc.returncode != 0:
        raise AssertionError(f"lora-sdpo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def fixture_recipe(folder: Path, data_dir: Path, held_out: Path, extra: str = "") -> Path:
    """The recipe of the shared two-step run (its held-out file `held_out`), with `extra` TOML after it."""
    return write_recipe(folder, data_dir, extra=f'samples = 2\nsample_tokens = 16\n\n[[data.eval]]\npath = "{held_out}"\n' + extra)


@pytest.fixture(scope="session")
def two_step_run(tmp_path_factory, data_dir) -> Path:
    """One real two-step sDPO run through the CLI, shared by the invariant tests."""
    folder = tmp_path_factory.mktemp("two_step")
    # Held-out pairs: the gamma matrix's eval column and the report's samples (2 prompts, 16 tokens).
    held_out = write_jsonl(folder / "eval.jsonl", short_rows(ROOT / "data" / "ultrafeedback" / "eval_clean.jsonl", 4))
    recipe = fixture_recipe(folder, data_dir, held_out)
    out = folder / "run"
    cli("run", str(recipe), "--output", str(out))
    return out


# LORA_SDPO_TEST_CPU=1: after the run, the tests that took the most CPU time (this process and the
# CLI runs it waited for), a measure that other jobs on the machine do not inflate as they do the
# wall times of --durations.
_CPU: list[tuple[float, str]] = []


def _cpu_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + (_SERVER.cpu if _SERVER is not None else 0.0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("LORA_SDPO_TEST_CPU"):
        yield
        return
    start = _cpu_seconds()
    yield
    _CPU.append((_cpu_seconds() - start, item.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _SERVER is not None and (_SERVER.forked or _SERVER.declined):
        why = sorted({k for keys in _SERVER.declined for k in keys})
        terminalreporter.write_line(f"CLI calls: {_SERVER.forked} forked, {len(_SERVER.declined)} as new processes"
                                    + (f" (their environment differs in {', '.join(why)})" if why else ""))
    if _CPU:
        terminalreporter.section(f"CPU seconds per test (setup + call + teardown), total {sum(c for c, _ in _CPU):.1f}")
        for cpu, nodeid in sorted(_CPU, reverse=True)[:25]:
            terminalreporter.write_line(f"{cpu:8.1f}  {nodeid}")
