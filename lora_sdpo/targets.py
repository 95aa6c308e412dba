"""Which models a run holds, and how to load one.

A run directory holds S (the base it started from) and M_1..M_T (one merged model per finished
step, unless pruned by run.keep_models); outside a run, a target is one model folder or Hub id,
with an optional PEFT adapter. `eval`, `generate`, the run's samples and the report name models
the same way (S, M_1, ...) and order them as the paper does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import manifest
from .errors import EvalError
from .fetch import local_model_dir
from .locations import no_model_folder
from .manifest import Manifest
from .rundir import RunDir, sha256_file


@dataclass
class Target:
    label: str  # S, M_1, ... for a run; the folder name or Hub id for a model
    path: Path
    adapter: Path | None = None
    shown: str = ""  # how the model is named in the results (relative to the run for a run)


def model_order(label: str) -> tuple[int, int]:
    """S, M_1, M_2, ... in the paper's order, whatever order they were evaluated or sampled in."""
    if label == "S":
        return (0, 0)
    return (1, int(label[2:])) if label.startswith("M_") and label[2:].isdigit() else (2, 0)


def model_target(location: str, adapter: str | None) -> Target:
    p = Path(location)
    problem = no_model_folder(location)
    if problem:
        raise EvalError(problem)
    if not p.exists() and location.count("/") > 1:
        raise EvalError(f"no model folder at {location}, and not a Hub id (OWNER/NAME)")
    folder = local_model_dir(location)
    if not (folder / "config.json").is_file():
        raise EvalError(f"model {folder}: no config.json; give a model folder (safetensors + config), a Hub id or a run directory")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise EvalError(f"--adapter {adapter}: no adapter_config.json; give a PEFT adapter folder")
    return Target(p.name if p.exists() else location, folder, Path(adapter) if adapter else None, location)


def run_targets(root: str, steps: str) -> tuple[list[Target], list[str]]:
    """([S, M_1, ...], [pruned models left out]) of a run directory; `steps` is `all` or indices, 0 meaning S."""
    run = RunDir(Path(root))
    m = manifest.read(run)
    done = {s.index: s for s in m.steps if s.status == "done"}
    if steps == "all":
        wanted, explicit = [0, *sorted(done)], False
    else:
        try:
            wanted, explicit = [int(x) for x in steps.split(",") if x.strip()], True
        except ValueError:
            raise EvalError(f"--steps {steps}: write all, or step numbers such as 0,2 (0 is the base S)") from None
    targets, pruned = [], []
    for i in wanted:
        if i == 0:
            targets.append(Target("S", base_dir(run, m), shown=str(m.base_model)))
            continue
        if i not in done:
            n = len(m.steps)
            raise EvalError(f"--steps: step {i} of {root} is not finished (the run has {n} steps, finished: {sorted(done) or 'none'})")
        model = run.model_dir(i)
        if not done[i].model or not model.is_dir():
            if explicit:
                raise EvalError(f"{model}: M_{i} was pruned (run.keep_models = \"last\"); rebuild it by merging the adapters "
                                f"of steps {'1' if i == 1 else f'1..{i}'} into S in turn (`lora-sdpo merge`), and evaluate that folder")
            pruned.append(f"M_{i}")
            continue
        targets.append(Target(f"M_{i}", model, shown=run.rel(model)))
    if not targets:
        raise EvalError(f"{root}: nothing to evaluate (no finished step keeps its model, and S was not asked for)")
    return targets, pruned


def base_dir(run: RunDir, m: Manifest) -> Path:
    """The folder of S: where step 1 loaded it from (its adapter's config records it), else the manifest's name."""
    cfg = run.adapter_dir(1) / "adapter_config.json"
    loaded = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.is_file() else None
    if loaded and (Path(loaded) / "config.json").is_file():
        return Path(loaded)
    seen = m.base_model or ""
    if (Path(seen) / "config.json").is_file():
        return Path(seen).resolve()
    try:
        return local_model_dir(seen)
    except Exception:
        raise EvalError(f"{run.root}: cannot find the base model S ({seen!r}, as the recipe names it); "
                        "leave it out with --steps (e.g. --steps 1,2), or run from the recipe's folder") from None


def fingerprint(target: Target) -> str:
    """sha256 over the config and every weight file (names and contents) of the model and adapter."""
    digests = []
    for folder, patterns in ((target.path, ("config.json", "*.safetensors")),
                             (target.adapter, ("adapter_config.json", "*.safetensors"))):
        if folder is None:
            continue
        files = sorted({f for pat in patterns for f in Path(folder).glob(pat)})
        digests.append({f.name: sha256_file(f) for f in files})
    return _combine(digests)


def fingerprint_from_manifest(model_files: dict[str, str]) -> str:
    """The same fingerprint of a run's M_t from the file hashes its manifest records (nothing is read)."""
    return _combine([{n: d for n, d in model_files.items() if "/" not in n and (n == "config.json" or n.endswith(".safetensors"))}])


def _combine(digests: list[dict[str, str]]) -> str:
    h = hashlib.sha256()
    for files in digests:
        for name in sorted(files):
            h.update(f"{name}\0{files[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def load_model(target: Target, precision: str, compute_dtype: str):
    """(model, tokenizer) of a target in eval mode: NF4 quantised from float32, or bf16/fp32; its adapter applied."""
    # torch, transformers and PEFT are imported here, not at the top: the report and `generate
    # --help` resolve targets without the training stack.
    from peft import PeftModel

    from .model import load_base, load_tokenizer
    from .recipe import AdapterConfig

    if precision == "nf4":
        cfg = AdapterConfig(quantization="nf4", compute_dtype=compute_dtype)
    else:
        cfg = AdapterConfig(quantization="none", compute_dtype={"bf16": "bfloat16", "fp32": "float32"}[precision])
    model = load_base(target.path, cfg)
    if target.adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, str(target.adapter))
        except Exception as e:
            raise EvalError(f"--adapter {target.adapter}: cannot apply it to {target.path} ({type(e).__name__}: {e})") from None
    model.eval()
    return model, load_tokenizer(target.path)
