"""`lora-sdpo eval`: lm-evaluation-harness scores of a model, or of S and every M_t of a run.

The paper (Kim et al. 2024, Table 2) reports H4, the Open LLM Leaderboard v1 set-up: the mean of
ARC-Challenge (25-shot, acc_norm), HellaSwag (10-shot, acc_norm), MMLU (5-shot, acc) and
TruthfulQA (0-shot, mc2). `H4` below is that expansion, in one place. The harness does the
evaluating: we load the model as lora-sdpo loads it (NF4 quantised from float32, or bf16/fp32),
hand it to lm-eval's `HFLM`, and set each task's shots on lm-eval's own Task objects.

Two details of the leaderboard v1 that today's harness does differently, and that we follow:
MMLU is the unweighted mean of its 57 subjects (the harness's `mmlu` group weights them by size;
we record that number too), and no chat template is applied.

This module imports lm-eval only inside the functions that evaluate, so the report can render
stored scores without it.
"""

from __future__ import annotations

import difflib
import functools
import gc
import logging
import math
import time
from importlib.metadata import version
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__, manifest
from .errors import EvalError
from .manifest import EvalRecord
from .rundir import RunDir, is_run_dir
from .targets import Target, fingerprint, load_model, model_order, model_target, run_targets

INSTALL_HINT = "lm-evaluation-harness is not installed; install it with: pip install 'lora-sdpo[eval]'"


@dataclass(frozen=True)
class HarnessTask:
    """One column of the results: an lm-eval task (or group), its shots and the metric reported."""

    name: str
    shots: int | None = None  # None: the task's own default
    metric: str | None = None  # lm-eval's metric key; None: the task's first metric
    label: str = ""  # column title
    macro: bool = False  # a group scored as the unweighted mean of its leaf tasks


# Open LLM Leaderboard v1, as in the paper's H4. lm-eval's truthfulqa_mc2 reports mc2 under "acc".
H4 = (
    HarnessTask("arc_challenge", 25, "acc_norm", "ARC"),
    HarnessTask("hellaswag", 10, "acc_norm", "HellaSwag"),
    HarnessTask("mmlu", 5, "acc", "MMLU", macro=True),
    HarnessTask("truthfulqa_mc2", 0, "acc", "TruthfulQA"),
)


def parse_tasks(spec: str) -> list[HarnessTask]:
    """`h4`, task names and `NAME:SHOTS`, comma-separated, in order, without repeats."""
    out: list[HarnessTask] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.lower() == "h4":
            new = list(H4)
        else:
            name, _, shots = item.partition(":")
            if shots and not shots.isdigit():
                raise EvalError(f"--tasks: {item!r}: write NAME or NAME:SHOTS with SHOTS a whole number")
            new = [HarnessTask(name.strip(), int(shots) if shots else None, label=name.strip())]
        for t in new:
            if any(o.name == t.name for o in out):
                raise EvalError(f"--tasks: {t.name} is named twice (h4 includes {', '.join(x.name for x in H4)})")
            out.append(t)
    if not out:
        raise EvalError("--tasks: name at least one task, e.g. h4 or arc_easy")
    return out


# ---------------------------------------------------------------- evaluating


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise EvalError(INSTALL_HINT) from None
    return lm_eval


def task_manager(tasks: list[HarnessTask], include: list[str]):
    """lm-eval's TaskManager over the include folders (and its own tasks unless all are local); checks names."""
    require_lm_eval()
    for d in include:
        if not Path(d).is_dir():
            raise EvalError(f"--include {d}: no such folder (give a folder of lm-eval task YAMLs)")
    names = [t.name for t in tasks]
    # Indexing lm-eval's own ~10k task files takes seconds; skip it when the include folders have every task.
    if include:
        local = _indexed(tuple(include), False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = _indexed(tuple(include), True)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3)
            hints.append(f"{n}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvalError(f"--tasks: unknown lm-eval task {'; '.join(hints)}. Local task YAMLs need --include DIR; "
                        "`lm-eval ls tasks` lists the harness's own")
    return tm


@functools.cache
def _indexed(include: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager; built once per process (its index only reads the task YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def load_tasks(tm, tasks: list[HarnessTask]) -> list:
    """lm-eval Task/Group objects with each task's shots set; loading reads (or downloads) the data."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    objects, owner = [], {}
    for spec in tasks:
        try:
            loaded = tm.load([spec.name])
        except Exception as e:  # a dataset that is not cached offline, a broken YAML: the harness's own message
            raise EvalError(f"task {spec.name}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                            "Offline (HF_DATASETS_OFFLINE=1) only tasks with cached or local data work") from None
        for name, task in loaded["tasks"].items():
            if name in owner:  # lm-eval refuses a task that two requested names contain
                raise EvalError(f"--tasks: {owner[name]} and {spec.name} both contain the task {name}; name it once")
            owner[name] = spec.name
            if spec.shots is not None:
                task.set_config(key="num_fewshot", value=spec.shots)
        if spec.name in loaded.get("groups", {}):
            objects.append(loaded["groups"][spec.name])
        else:
            objects.extend(loaded["tasks"].values())
    return objects


def evaluate_target(target: Target, tasks: list[HarnessTask], task_objects: list, tm, *, limit: int | None,
                    batch_size: str, precision: str, compute_dtype: str) -> dict:
    """One model through lm-eval: its record (scores per task, fingerprint, settings, time)."""
    import torch  # here, with lm-eval (optional): the report renders stored scores without either
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.time()
    model, tokenizer = load_model(target, precision, compute_dtype)
    device = next(model.parameters()).device
    # lm-eval's automatic batch size only backs off on CUDA out-of-memory errors; on a CPU it would
    # start at 64 full-length sequences, so there "auto" means a fixed 8.
    bs = batch_size if not batch_size.startswith("auto") or device.type == "cuda" else "8"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs if bs.startswith("auto") else int(bs))
    # Our TaskManager, or simple_evaluate would index all of lm-eval's task files again (seconds).
    results = simple_evaluate(model=lm, tasks=task_objects, task_manager=tm, limit=limit, log_samples=False)
    record = {
        "model": target.shown or str(target.path),
        "adapter": str(target.adapter) if target.adapter else None,
        "fingerprint": fingerprint(target),
        "precision": precision if precision != "nf4" else f"nf4, {compute_dtype} compute",
        "lm_eval": results.get("lm_eval_version") or version("lm_eval"),
        "batch_size": bs,
        "seconds": round(time.time() - start, 1),
        "scores": {t.name: task_score(results, t, limit) for t in tasks},
        "seeds": {k: results.get("config", {}).get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
    }
    record["h4"] = h4_score(record["scores"])
    del lm, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def _metric_key(metrics: dict, metric: str | None) -> str | None:
    """lm-eval's "metric,filter" key: the named metric's, or the task's first metric."""
    for key in metrics:
        m, sep, _ = key.partition(",")
        if sep and not m.endswith("_stderr") and (metric is None or m == metric):
            return key
    return None


def _leaves(results: dict, name: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for c in children for leaf in _leaves(results, c)]


def task_score(results: dict, spec: HarnessTask, limit: int | None) -> dict:
    """Score, stderr, shots, version and sample count of one requested task from lm-eval's results."""
    res = results["results"]
    leaves = _leaves(results, spec.name)
    metrics = res.get(spec.name, {})
    key = _metric_key(metrics, spec.metric)
    entry = {"label": spec.label or spec.name}
    if spec.macro or key is None and len(leaves) > 1:
        key = _metric_key(res[leaves[0]], spec.metric)
        values = [res[t][key] for t in leaves]
        errs = [res[t].get(key.replace(",", "_stderr,", 1)) for t in leaves]
        entry |= {
            "value": sum(values) / len(values),
            "stderr": math.sqrt(sum(e * e for e in errs)) / len(errs) if all(isinstance(e, float) for e in errs) else None,
            "aggregate": f"unweighted mean of {len(leaves)} tasks",
        }
        if key in metrics:
            entry["harness_value"] = metrics[key]  # the harness's own (size-weighted) group score
    elif key is not None:
        se = metrics.get(key.replace(",", "_stderr,", 1))
        entry |= {"value": metrics[key], "stderr": se if isinstance(se, float) else None}
    else:
        raise EvalError(f"task {spec.name}: lm-eval returned no {spec.metric or 'metric'} for it")
    shots = results.get("n-shot", {})
    entry |= {
        "metric": key.partition(",")[0],
        "shots": shots.get(spec.name, shots.get(leaves[0])),
        "version": results.get("versions", {}).get(spec.name, results.get("versions", {}).get(leaves[0])),
        "samples": sum((results.get("n-samples", {}).get(t) or {}).get("effective", 0) for t in leaves),
        "total": sum((results.get("n-samples", {}).get(t) or {}).get("original", 0) for t in leaves),
        "limit": limit,
        # Every metric the harness reported for the task (e.g. acc and acc_norm), as it named them.
        "metrics": {k: v for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))},
    }
    return entry


def h4_score(scores: dict) -> float | None:
    """Mean of the four H4 tasks, when all four were scored the leaderboard's way."""
    vals = []
    for t in H4:
        s = scores.get(t.name)
        if s is None or s.get("shots") != t.shots or s.get("metric") != t.metric or s.get("value") is None:
            return None
        vals.append(s["value"])
    return sum(vals) / len(vals)


def evaluate(location: str, tasks_spec: str, *, include: list[str], limit: int | None, steps: str, batch_size: str,
             adapter: str | None, precision: str, compute_dtype: str, log=print) -> dict:
    """`lora-sdpo eval`: the results document (and, for a run, its manifest's `eval` key; the caller rebuilds the report)."""
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0) and not batch_size.startswith("auto:"):
        raise EvalError(f"--batch-size {batch_size}: give a positive number or auto")
    if limit is not None and limit <= 0:
        raise EvalError("--limit: give a positive number of examples per task")
    tasks = parse_tasks(tasks_spec)
    run = is_run_dir(location)
    if run:
        if adapter:
            raise EvalError("--adapter applies to a model, not to a run directory (a run's M_t already include their adapters)")
        targets, pruned = run_targets(location, steps)
        if pruned:
            log(f"not evaluated: {', '.join(pruned)} (pruned by run.keep_models = \"last\")")
    else:
        if steps != "all":
            raise EvalError(f"--steps applies to a run directory; {location} has no manifest.json")
        targets = [model_target(location, adapter)]
    tm = task_manager(tasks, include)
    task_objects = load_tasks(tm, tasks)
    doc = {
        "lora_sdpo": __version__,  # the running code's (no installed distribution with PYTHONPATH)
        "lm_eval": version("lm_eval"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(location),
        "tasks": [asdict(t) for t in tasks],
        "include": [str(Path(d).resolve()) for d in include],
        "limit": limit,
        "models": {},
    }
    for target in targets:
        log(f"evaluating {target.label} ({target.shown or target.path}) on {', '.join(t.name for t in tasks)}")
        rec = evaluate_target(target, tasks, task_objects, tm, limit=limit, batch_size=batch_size,
                              precision=precision, compute_dtype=compute_dtype)
        doc["models"][target.label] = rec
        log(f"{target.label}: " + ", ".join(f"{s['label']} {_cell(s)}" for s in rec["scores"].values())
            + (f", H4 {100 * rec['h4']:.2f}" if rec["h4"] is not None else "") + f" ({rec['seconds']:.0f}s)")
        if run:
            store_in_manifest(Path(location), target.label, rec)
    return doc


def store_in_manifest(root: Path, label: str, record: dict) -> None:
    """Merge one model's scores into the manifest's `eval` key (re-read first: a manifest is the run's truth)."""
    run = RunDir(root)
    m = manifest.read(run)
    if m is None:
        raise EvalError(f"{run.manifest_path}: missing; the scores of {label} have no run to go into")
    ev = m.eval or EvalRecord()
    models = dict(ev.models)
    old = models.get(label)
    if old and old.get("fingerprint") == record["fingerprint"] and old.get("precision") == record["precision"]:
        # The same weights at the same precision: keep scores of tasks not evaluated this time.
        record = {**record, "scores": {**old.get("scores", {}), **record["scores"]}}
        record["h4"] = h4_score(record["scores"])
    models[label] = record
    ev.models = dict(sorted(models.items(), key=lambda kv: model_order(kv[0])))
    m.eval = ev
    manifest.write(run, m)


# ---------------------------------------------------------------- tables


def _cell(score: dict | None) -> str:
    if not score or score.get("value") is None:
        return ""
    se = f" ± {100 * score['stderr']:.2f}" if score.get("stderr") is not None else ""
    return f"{100 * score['value']:.2f}{se}"


def results_table(models: dict, stale: set[str] = frozenset()) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) like the paper's Table 2: H4 and each task per model, scores x 100 ± stderr.

    `stale`: models whose weights changed after they were evaluated (their scores are marked).
    """
    models = dict(sorted(models.items(), key=lambda kv: model_order(kv[0])))
    mixed = len({rec.get("precision") for rec in models.values()}) > 1
    names: list[str] = []
    labels: dict[str, str] = {}
    for rec in models.values():
        for name, s in rec.get("scores", {}).items():
            if name not in names:
                names.append(name)
                labels[name] = s.get("label") or name
    order = [t.name for t in H4 if t.name in names] + [n for n in names if n not in {t.name for t in H4}]
    with_h4 = any(rec.get("h4") is not None for rec in models.values())
    header = ["model"] + (["H4"] if with_h4 else []) + [labels[n] for n in order]
    rows = []
    for label, rec in models.items():
        h4 = [f"{100 * rec['h4']:.2f}" if rec.get("h4") is not None else ""] if with_h4 else []
        shown = f"{label} ({rec.get('precision')})" if mixed else label
        shown += " (stale: its weights changed since; evaluate again)" if label in stale else ""
        rows.append([shown] + h4 + [_cell(rec.get("scores", {}).get(n)) for n in order])
    notes = []
    for n in order:
        scored = [rec["scores"][n] for rec in models.values() if n in rec.get("scores", {})]
        hows = sorted({f"{s['metric']}, {s['shots']}-shot" + (f", {s['aggregate']}" if s.get("aggregate") else "") for s in scored})
        how = " / ".join(hows) + (" (differs between models)" if len(hows) > 1 else "")
        cut = sorted({f"{s['samples']} of {s['total']}" for s in scored if s.get("limit") and s["samples"] < s.get("total", 0)})
        how += f", only {' / '.join(cut)} examples (--limit)" if cut else ""
        notes.append(f"{labels[n]}: `{n}` ({how})")
    return header, rows, notes
