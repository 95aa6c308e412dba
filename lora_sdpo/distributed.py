"""Several processes and machines through accelerate: the global batch, who does what, FSDP, and proof.

`lora-sdpo run RECIPE --num-processes N` re-runs the same command under `accelerate launch`
(torch's elastic launcher underneath), so it is the same as what a user types by hand:

    accelerate launch --multi_gpu --num_processes N -m lora_sdpo run RECIPE ...

(`--multi_gpu` selects accelerate's torchrun launcher; on a CPU machine it starts N CPU processes
that talk over gloo. `accelerate launch --cpu --num_processes N` starts only one.) With
`--num-machines M --machine-rank R --main-process-ip IP --main-process-port P` the same command runs
once on every machine, and accelerate's `--num_machines`/`--machine_rank` join them into one job.
launcher.py starts them and says how they ended; this module is what runs inside them.

Inside each process:
  - `init` joins the process group (gloo on CPUs, nccl on GPUs) with the recipe's timeout before
    transformers does, and refuses to go on when this process cannot see the others: the trap
    where a launcher starts N processes that each train alone on all the data. Each process then
    counts up a heartbeat in the launcher's store.
  - `launcher.check_shared_dir`: every process proves that it sees the run directory the main process
    sees (a token written by the one, read back by the others), or all stop, writing nothing.
  - every process loads the NF4 model and trains under DDP, or FSDP2 (the base sharded; on CPU
    processes through `prepare_accelerate`); TRL splits the reference pass across the processes
    and gathers it into one cache; the per-process batch and accumulation are chosen so that
    per-device x accumulation x N is the recipe's global batch.
  - the main process alone writes the run directory: manifest, merge, retention, gamma matrix,
    report; the others wait at a barrier and then load M_t for the next step.
  - a process that fails ends itself; the launcher then stops the others on its machine (torch
    elastic), the other machines' processes lose their connection and name the processes whose
    heartbeat stopped (`launcher.lost_peer_message`), and a process stuck waiting for a peer that hangs
    gives up after `distributed.timeout_minutes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from transformers import TrainerCallback

from .errors import RecipeError, RunError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    machine: int = 0  # the machine (node) rank, --machine-rank
    machines: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the launcher's environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
    and GROUP_RANK / GROUP_WORLD_SIZE for the machine)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        machine=int(os.environ.get("GROUP_RANK", 0)),
        machines=int(os.environ.get("GROUP_WORLD_SIZE", 1)),
    )


def is_main() -> bool:
    return world().main


# ---------------------------------------------------------------------------------------------
# The global batch


def split_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """(per-process batch, accumulation) with batch x accumulation x N = the recipe's global batch.

    The recipe's per_device_train_batch_size x gradient_accumulation_steps is the global batch of
    one optimizer step, as a single process runs it. With N processes the per-process batch stays
    as large as the recipe's (memory) and is cut only as far as needed.
    """
    total = per_device * accumulation
    if total % processes:
        raise RecipeError(
            f"training.per_device_train_batch_size x training.gradient_accumulation_steps = {per_device} x "
            f"{accumulation} = {total} (the global batch) is not divisible by {processes} processes; "
            f"make the global batch a multiple of {processes} or use another --num-processes"
        )
    share = total // processes
    batch = max(b for b in range(1, min(per_device, share) + 1) if share % b == 0)
    return batch, share // batch


# ---------------------------------------------------------------------------------------------
# Inside the processes


def check(recipe, processes: int) -> None:
    """What must hold for a run in N processes, checked before any of them starts."""
    t = recipe.recipe.training
    split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, processes)
    check_strategy(recipe.recipe.distributed, _has_accelerator())


def start(recipe, processes: int | None) -> World:
    """In each launched process (or the only one): check, then join the others."""
    w = world()
    if not w.active:
        return w
    if processes not in (None, w.size):
        raise RunError(f"--num-processes {processes}: this process is one of {w.size} started by a launcher; "
                       "drop the option under accelerate launch")
    check(recipe, w.size)
    return init(recipe.recipe.distributed.timeout_minutes)


def init(timeout_minutes: float) -> World:
    """Join the process group (before transformers does, so that the recipe's timeout applies).

    Refuses to go on unless accelerate sees the same number of processes as the launcher started.
    """
    w = world()
    if not w.active:
        return w
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(w.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    state = PartialState(cpu=not cuda)
    if state.num_processes != w.size or state.process_index != w.rank:
        raise RunError(
            f"the launcher started {w.size} processes but accelerate sees {state.num_processes} "
            f"(this is process {state.process_index}): each would train alone on all the data. "
            "Launch with `lora-sdpo run --num-processes N` or `accelerate launch --multi_gpu --num_processes N -m lora_sdpo run ...`"
        )
    if not w.main:
        os.environ["TQDM_DISABLE"] = "1"  # TRL's and datasets' progress bars: the main process shows them
    start_heartbeat(w.rank)
    record("started")
    return w


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """The main process does the body first (writes files, fills caches); the others follow."""
    w = world()
    if not w.main:
        barrier()
    yield
    if w.main:
        barrier()


def broadcast(obj):
    """The main process's obj, in every process (obj itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj) -> list:
    """obj from every process, in rank order (a list of one without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """The end of a successful run in this process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    record("finished")


# ---------------------------------------------------------------------------------------------
# Proof that the work was shared


class BatchLedger(TrainerCallback):
    """What this process trained on: micro-batches and the pairs in them, per optimizer step.

    A forward pre-hook on the policy counts the pairs of every training forward (TRL puts the
    chosen rows first, then the rejected ones) and fingerprints each chosen sequence, so that a
    test can check that the processes saw disjoint halves whose union per optimizer step is the
    single-process global batch. A step resumed from a trainer checkpoint records the optimizer
    steps trained after it only.
    """

    def __init__(self):
        self.steps: dict[int, list[str]] = {}
        self.micro_batches = 0
        self._handle = None
        self._model = None
        self._step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module, args, kwargs):
        if not module.training:
            return
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        pairs = ids.shape[0] // 2
        self.micro_batches += 1
        self.steps.setdefault(self._step, []).extend(
            hashlib.sha1(ids[i][mask[i].bool()].cpu().numpy().tobytes()).hexdigest()[:12] for i in range(pairs)
        )

    def summary(self, rank: int) -> dict:
        w = world()
        return {
            "rank": rank,
            "machine": w.machine,
            "host": socket.gethostname(),
            "local_rank": w.local_rank,
            **({"fsdp_shards": shard_report(self._model)} if self._model is not None and _is_fsdp2(self._model) else {}),
            "micro_batches": self.micro_batches,
            "pairs": sum(len(v) for v in self.steps.values()),
            "optimizer_steps": len(self.steps),
            "steps": {str(k): v for k, v in sorted(self.steps.items())},
        }


# ---------------------------------------------------------------------------------------------
# Configuring the trainer


def trainer_args(cfg) -> dict:
    """transformers TrainingArguments for the recipe's [distributed] strategy (none for one process)."""
    w = world()
    if not w.active:
        return {}
    args = {
        # every LoRA weight takes part in every forward; searching for unused ones costs a graph
        # walk a step and breaks with gradient checkpointing
        "ddp_find_unused_parameters": False,
        "ddp_timeout": int(cfg.timeout_minutes * 60),
    }
    if cfg.strategy == "fsdp":
        # FSDP2 through accelerate (`fsdp2_prepare_model`): one unit per decoder layer (the model's
        # _no_split_modules), the embeddings and the final norm + LM head as units of their own, the
        # root last. The LoRA weights are sharded inside their decoder layer's unit: transformers'
        # update_fsdp_plugin_peft (LoRA layers wrapped apart, mixed precision set to the 4-bit storage
        # dtype) runs only when the optimizer is created after the model is prepared, which it is not
        # under FSDP2 (Trainer._prepare_for_training), so nothing of it applies here. No mixed
        # precision policy is added: under bf16 autocast accelerate sets FSDP2's to bfloat16, and the
        # 4-bit storage is then bfloat16 too (quant_storage below); FSDP2 asks one dtype of the
        # trainable weights of a unit only, which the LoRA weights are (TRL keeps a QLoRA adapter in bf16).
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "cpu_offload": cfg.fsdp_cpu_offload,
            "state_dict_type": "FULL_STATE_DICT",
        }
    return args


def quant_storage(cfg, adapter) -> str | None:
    """bnb's 4-bit storage dtype under FSDP, else bnb's default uint8 (the NF4 numbers are the same).

    FSDP shards floating-point tensors only, so under FSDP the packed 4-bit words are stored in the
    compute dtype (`cfg`: the step's recipe). FSDP2 must then never cast them (a cast would round
    their bits away): `compute_as_ddp` clears the casts of accelerate's mixed-precision policy.
    """
    if world().active and cfg.distributed.strategy == "fsdp" and adapter.quantization == "nf4":
        return adapter.compute_dtype
    return None


def _has_accelerator() -> bool:
    """A GPU or another accelerator torch knows (where accelerate enables FSDP itself)."""
    import torch

    return torch.accelerator.is_available()


def check_strategy(cfg, accelerator: bool) -> None:
    """Refuse what cannot run here: FSDP2's CPU offload pins host memory for an accelerator."""
    if cfg.strategy == "fsdp" and cfg.fsdp_cpu_offload and not accelerator:
        raise RecipeError(
            "distributed.fsdp_cpu_offload = true: FSDP2's CPU offload moves the shards between pinned host memory "
            "and a GPU, and this machine has none (the processes already run on the CPU); set "
            "distributed.fsdp_cpu_offload = false"
        )


def prepare_accelerate(args) -> None:
    """Let accelerate run FSDP2 on CPU processes (gloo), as it does on accelerators.

    accelerate 1.15 turns FSDP on only for accelerator device types (AcceleratorState.__init__:
    the FSDP branch is inside `distributed_type in [MULTI_GPU, MULTI_XPU, ...]`); on CPU processes
    it keeps MULTI_CPU and silently trains with DDP. FSDP2 itself (torch's fully_shard) runs on
    CPU processes over gloo, and the rest of accelerate's FSDP2 path does not depend on the device.
    So, only when there is no accelerator, the state the trainer's Accelerator will find is made
    here first, and given what that branch gives it: the FSDP distributed type and the plugin
    (built from the same TrainingArguments the trainer builds its own from). Everything else,
    preparing the model, sharding, gathering, checkpoints, is accelerate's and transformers' own.
    """
    if not (world().active and args.fsdp) or _has_accelerator():
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    state = AcceleratorState(mixed_precision=args.mixed_precision, cpu=True, dynamo_plugin=TorchDynamoPlugin(),
                             fsdp_plugin=plugin, _from_accelerator=True)
    if state.distributed_type == DistributedType.MULTI_CPU:  # what the FSDP branch would have set
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin


def compute_as_ddp(trainer) -> None:
    """Under FSDP2, compute in the dtypes DDP computes in: bf16 through autocast, no weight casts.

    accelerate gives FSDP2 a mixed-precision policy that casts every weight it gathers to the
    autocast dtype (norms, embeddings, head and the LoRA weights included). The reference pass (step.py)
    runs before accelerate wraps the model (in `train`), so it sees the weights as stored:
    the training forward would then no longer be the reference pass, and the first loss of a step
    would not be ln 2 (0.7005 against ln 2 on the test recipe in bf16 over two processes). With no
    casts in the policy, autocast alone (which accelerate applies under FSDP2 as under DDP) decides
    the compute dtype, as in the reference pass. Gathering costs the stored width instead of bf16's
    for the weights that are not 4-bit: the norms and the adapter, a few MB at 7B. Called after the
    trainer is built and before it trains (accelerate wraps the model in `train`)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy()


def check_trainer(trainer, cfg) -> None:
    """The trainer really is distributed as asked (a launcher misconfiguration would otherwise train
    N independent copies, or DDP instead of FSDP, without a word)."""
    w = world()
    if not w.active:
        return
    seen = trainer.accelerator.num_processes
    if seen != w.size:
        raise RunError(f"the trainer sees {seen} process(es) of the {w.size} launched; each would train alone")
    if cfg.strategy == "fsdp" and not (trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2):
        raise RunError("distributed.strategy = \"fsdp\" but accelerate did not enable FSDP2")


def adapter_state_dict(trainer):
    """The adapter's full weights where they are sharded (FSDP: a collective, every process calls
    it; the main process gets them, the others an empty dict); None under DDP or one process, where
    the main process's model holds them whole. Only the trainable (LoRA) weights are gathered, not
    the base."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(trainer.model_wrapped, options=options)


def _is_fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_report(model) -> dict:
    """How this process holds the 4-bit weights under FSDP2: how many of them are sharded, and the
    elements of their packed storage here against the whole (ranks.json: the proof that the base
    is split among the processes, not replicated)."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    sharded = [w for w in weights if isinstance(w, DTensor)]
    return {
        "nf4_weights": len(weights),
        "sharded": len(sharded),
        "local_elements": sum(w.to_local().numel() for w in sharded),
        "whole_elements": sum(w.numel() for w in sharded),
        "storage_dtype": str(sharded[0].dtype).removeprefix("torch.") if sharded else None,
    }


def batch_report(recipe, shares: list[dict], rows: int) -> dict:
    """The manifest's record of how the step's batches were shared among the processes.

    `repeated_pairs`: when D_t's pairs do not fill the last global batch of an epoch, accelerate
    fills every process's last batch with pairs from the start of the epoch (even_batches: a
    process cannot skip an optimizer step the others take), where one process takes a smaller
    last step. That is the only way N processes train differently from one.
    """
    t = recipe.training
    n = len(shares)
    batch, accumulation = split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, n)
    return {
        "count": n,
        "strategy": recipe.distributed.strategy if n > 1 else "single",
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "global_batch": batch * accumulation * n,
        "pairs": [s["pairs"] for s in shares],
        "micro_batches": [s["micro_batches"] for s in shares],
        "repeated_pairs": max(0, sum(s["pairs"] for s in shares) - round(rows * t.num_train_epochs)),
    }


# ---------------------------------------------------------------------------------------------
# What each process leaves for the launcher (launcher.py reads it)

ERROR_DIR_ENV = "LORA_SDPO_ERROR_DIR"  # where each process leaves its error message for the launcher


def record_error(message: str, status: int, lost: bool = False) -> None:
    """Leave this process's error for the launching `lora-sdpo run --num-processes` (a no-op otherwise)."""
    record("error", {"message": message, "status": status, "time": time.time(), "lost": lost})


def record(kind: str, content: dict | None = None) -> None:
    """rank-R.started / .finished / .error in the launcher's folder: how each process ended."""
    folder = os.environ.get(ERROR_DIR_ENV)
    w = world()
    if folder and w.active:
        with contextlib.suppress(OSError):
            Path(folder, f"rank-{w.rank}.{kind}").write_text(json.dumps({"rank": w.rank, **(content or {})}))


# ---------------------------------------------------------------------------------------------
# Who is still there: a heartbeat per process in the launcher's store


BEAT_SECONDS = 0.5
BEAT_KEY = "lora-sdpo/beat/{}"


def store_client(timeout_s: float):
    """A client of the store the launcher (torch elastic) serves on machine 0, at MASTER_ADDR:MASTER_PORT."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def start_heartbeat(rank: int) -> None:
    """Count up this process's key in the store, from a thread, for as long as the process lives:
    a process whose count stops moving has died (or its machine is gone).

    The thread is stopped and joined when the interpreter exits (atexit runs before finalisation).
    Left running, it could be inside the store's C++ call when finalisation begins; the thread is
    then ended on its way back into Python, and that aborts the process ("terminate called without
    an active exception", exit -6) after a run that had finished: seen once, a worker of a
    2-process FSDP run, on a loaded machine."""
    import atexit
    import threading

    stop = threading.Event()

    def beat():
        with contextlib.suppress(Exception):  # the store is gone: the run is ending anyway
            store = store_client(10)
            while not stop.is_set():
                store.add(BEAT_KEY.format(rank), 1)
                stop.wait(BEAT_SECONDS)

    def end():
        stop.set()
        thread.join(timeout=2)  # one store call; a store that no longer answers must not hold up the exit

    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        thread = threading.Thread(target=beat, name="lora-sdpo-heartbeat", daemon=True)
        thread.start()
        atexit.register(end)
