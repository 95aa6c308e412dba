"""Two CPU processes through accelerate (gloo): really distributed, the same step as one process,
one reference cache, a clean stop when a process dies, and a resume.

One 2-process run is shared: step 1 (8 pairs, global batch 4 = 2 per process) finishes, then
process 1 is killed in step 2, and the same command resumes it. The 1-process run it is compared
with has the same global batch and the same micro-batches (2 pairs x 2 accumulated), so the only
difference left is where the two halves' gradients are summed (DDP's all-reduce vs accumulation).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, write_recipe

LIMITS = ("--set", "steps.0.sources.0.limit=8", "--set", "steps.1.sources.0.limit=4")


def _cli_in_process(*args):
    """The CLI's refusals before any launch, without a new interpreter (the libraries are loaded)."""
    from click.testing import CliRunner

    from lora_sdpo.cli import main

    return CliRunner().invoke(main, list(args))


def _lora_deltas(run) -> dict[str, torch.Tensor]:
    """scale * B @ A per adapted module: what the adapter adds to the weights."""
    t = load_file(run / "step-1" / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((run / "step-1" / "adapter" / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    return {k: s * t[k.replace("lora_A", "lora_B")].float() @ t[k].float() for k in t if "lora_A" in k}


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """Step 1 alone, in one process, 2 pairs x 2 accumulated: the same global batch of 4."""
    folder = tmp_path_factory.mktemp("single")
    recipe = write_recipe(folder, data_dir, steps=("orca.jsonl",))
    out = folder / "run"
    cli("run", str(recipe), "--output", str(out), *LIMITS[:2], "--set", "diagnostics.gamma_matrix=false",
        "--set", "training.per_device_train_batch_size=2", "--set", "training.gradient_accumulation_steps=2")
    return out


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, data_dir):
    """A 2-process run, process 1 killed in step 2, then resumed by the same command."""
    folder = tmp_path_factory.mktemp("two_processes")
    recipe = write_recipe(folder, data_dir)
    out = folder / "run"
    args = ["run", str(recipe), "--output", str(out), *LIMITS, "--num-processes", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_sdpo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    pids: dict[int, int] = {}
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            for line in list(lines):
                if m := re.match(r"process (\d) of 2 \(world size 2, backend gloo, pid (\d+)\)", line):
                    pids[int(m[1])] = int(m[2])
            manifest = out / "manifest.json"
            if 1 in pids and manifest.exists() and json.loads(manifest.read_text())["steps"][1].get("status") == "running":
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before process 1 could be killed:\n" + "".join(lines)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.time()
        status = proc.wait(timeout=120)  # torch's elastic agent stops process 0: no hang
        stopped_after = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    first = {"output": "".join(lines), "status": status, "stopped_after": stopped_after, "pids": pids,
             "manifest": json.loads((out / "manifest.json").read_text())}
    resumed = cli(*args)
    return {"out": out, "first": first, "resumed": resumed}


def test_each_process_trains_on_its_half_of_every_global_batch(distributed_run, single):
    first = distributed_run["first"]
    assert "process 0 of 2 (world size 2, backend gloo" in first["output"]
    assert "process 1 of 2 (world size 2, backend gloo" in first["output"]
    assert first["pids"][0] != first["pids"][1]
    ranks = json.loads((distributed_run["out"] / "step-1" / "ranks.json").read_text())
    one = json.loads((single / "step-1" / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and len(one) == 1
    assert [r["pairs"] for r in ranks] == [4, 4] and one[0]["pairs"] == 8  # each process half of the 8 pairs
    assert [r["optimizer_steps"] for r in ranks] == [2, 2] == [one[0]["optimizer_steps"]] * 2
    for step, pairs in one[0]["steps"].items():  # every optimizer step: disjoint halves of the same global batch
        halves = [set(r["steps"][step]) for r in ranks]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(pairs)
    p = json.loads((distributed_run["out"] / "manifest.json").read_text())["steps"][0]["processes"]
    assert p == {"count": 2, "strategy": "ddp", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                 "global_batch": 4, "pairs": [4, 4], "micro_batches": [2, 2], "repeated_pairs": 0}


def test_step_1_matches_one_process_with_the_same_global_batch(distributed_run, single):
    two = json.loads((distributed_run["out"] / "manifest.json").read_text())["steps"][0]
    one = json.loads((single / "manifest.json").read_text())["steps"][0]
    assert two["rows"] == one["rows"] == 8
    assert abs(two["first_loss"] - math.log(2)) < 1e-6
    # The losses agree to float32 rounding (measured 6e-8).
    assert abs(two["last_loss"] - one["last_loss"]) < 1e-5
    # The adapters compute the same function: gamma of the trained model on the retention sample
    # (measured 8e-4 of ~14 nats) and the weight update scale * B @ A (measured relative 1.4e-3).
    # Single LoRA weights may differ by up to 2 x 0.74 x lr: lora_A gets no gradient in the first
    # update (lora_B starts at zero), so AdamW's second update moves each of its weights by
    # ~0.74 lr times the sign of its gradient, and where that gradient is at rounding level the
    # summation order (all-reduce vs accumulation) decides the sign. A one-process run with 4x1
    # instead of 2x2 batches differs from this one by as much (dW relative 3.3e-2).
    assert abs(two["retention_detail"]["gamma_adapter"] - one["retention_detail"]["gamma_adapter"]) < 1e-2
    d2, d1 = _lora_deltas(distributed_run["out"]), _lora_deltas(single)
    assert d2.keys() == d1.keys()
    worst = max(float((d2[k] - d1[k]).norm() / d1[k].norm()) for k in d1)
    assert worst < 1e-2, worst


def test_reference_cache_is_split_and_gathered_into_the_one_process_cache(distributed_run, single):
    two = load_file(distributed_run["out"] / "step-1" / "data" / "ref_logps.safetensors")
    one = load_file(single / "step-1" / "data" / "ref_logps.safetensors")
    assert torch.equal(two["row"], one["row"])
    for k in ("chosen", "rejected"):  # same NF4 model, same 2-pair batches: equal (measured exactly)
        assert torch.allclose(two[k], one[k], atol=1e-5, rtol=0), k


def test_a_killed_process_stops_the_run_and_the_same_command_resumes(distributed_run):
    first = distributed_run["first"]
    assert first["status"] != 0
    assert first["stopped_after"] < 60, first["stopped_after"]  # the launcher, not the 60-minute timeout
    assert re.search(r"error: the run stopped: process(es 0,)? 1 of 2 ended without a message", first["output"])
    assert "Root Cause" in first["output"]  # torch elastic's summary names the killed process
    assert "Run the same command again to resume" in first["output"]
    for pid in first["pids"].values():  # no process left behind
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert [s["status"] for s in first["manifest"]["steps"]] == ["done", "running"]
    resumed = distributed_run["resumed"].stdout
    assert "step 1/2: done earlier, skipped" in resumed and "step 2/2 done" in resumed
    m = json.loads((distributed_run["out"] / "manifest.json").read_text())
    assert m["status"] == "done" and [s["status"] for s in m["steps"]] == ["done", "done"]
    assert abs(m["steps"][1]["first_loss"] - math.log(2)) < 1e-6  # step 2's reference is exactly M_1
    assert m["steps"][1]["processes"]["count"] == 2


def test_batch_split_keeps_the_global_batch(tmp_path, data_dir):
    from lora_sdpo.distributed import split_batch
    from lora_sdpo.errors import RecipeError

    assert split_batch(8, 1, 2) == (4, 1) and split_batch(8, 2, 2) == (8, 1) and split_batch(2, 8, 4) == (2, 2)
    with pytest.raises(RecipeError, match="not divisible by 3 processes"):
        split_batch(4, 1, 3)
    recipe = write_recipe(tmp_path, data_dir)
    res = _cli_in_process("run", str(recipe), "--num-processes", "3", "--output", str(tmp_path / "run"))
    assert res.exit_code == 2 and "4 (the global batch) is not divisible by 3" in res.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is launched or written


def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, extra='\n[distributed]\nstrategy = "fsdp"\n')
    res = _cli_in_process("run", str(recipe), "--num-processes", "2", "--output", str(tmp_path / "run"))
    assert res.exit_code == 2 and "accelerate runs FSDP only on GPUs" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_plan_shows_the_split_and_per_process_memory(tmp_path, data_dir):
    from lora_sdpo.plan import make_plan
    from lora_sdpo.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, data_dir))
    text = "\n".join(make_plan(recipe, processes=2).lines)
    assert "per-process batch 2 x accumulation 1 x 2 processes = global batch 4" in text
    assert "peak GPU memory estimate per process (2 processes, ddp)" in text
