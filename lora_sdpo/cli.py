"""The command line: it parses and calls; the work lives in the modules it names."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from .errors import UserError


def _quiet_libraries() -> None:
    # The libraries' own chatter (deprecations, "loading weights") buries the lines users need.
    warnings.filterwarnings("ignore")
    # bitsandbytes warns at import that an optional Hub-downloaded CPU kernel is missing; the
    # built-in kernels are used instead, so the warning is noise.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="lora-sdpo")
def main() -> None:
    """Stepwise DPO (sDPO) on QLoRA."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", help="Run directory (default: the recipe's run.output_dir, else runs/NAME).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. training.beta=0.05.")
@click.option("--restart", is_flag=True, help="Delete the run directory's earlier run and start over.")
def run(recipe, output, overrides, restart):
    """Run every step of RECIPE; resumes a run directory that holds an unfinished run."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries()
    from rich.console import Console

    from .run import run_recipe

    console = Console(stderr=False, highlight=False)
    manifest = run_recipe(loaded, output=output, restart=restart, log=lambda m: console.print(m, soft_wrap=True))
    from .report import build_report, print_summary

    print_summary(manifest, console)
    report = build_report(loaded.output_dir(output))
    warn = loaded.recipe.retention.warn_below
    for s in manifest["steps"]:
        d = s["retention_detail"]
        if d["reliable"] and d["retention"] is not None and d["retention"] < warn:
            console.print(f"[yellow]warning: step {s['index']} kept only {d['retention']:.2f} of its gamma gain after the merge (< {warn})[/]")
    console.print(f"run complete: {loaded.output_dir(output)} (report: {report})")


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
        click.echo(f"  gamma mean {e['mean']:.3f}  median {e['median']:.3f}  std {e['std']:.3f}  "
                   f"fraction > 0 {e['frac_positive']:.3f}  (n={e['n']})")
        if "against" in e:
            a = e["against"]
            click.echo(f"  vs {against}: gamma_model > gamma_against on {a['frac_model_above']:.3f} of pairs, "
                       f"mean difference {a['mean_difference']:.3f} (against mean {a['against_mean']:.3f})")
        if "warning" in e:
            click.echo(f"  warning: {e['warning']}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
def plan(recipe, overrides):
    """Validate RECIPE and show its steps, data, token lengths and memory estimate."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries()
    from .plan import make_plan

    p = make_plan(loaded)
    click.echo("\n".join(p.lines))


@main.command()
@click.argument("base")
@click.argument("adapter", type=click.Path(file_okay=False, exists=True))
@click.option("--output", "-o", required=True, help="Folder for the merged model (must not exist inside BASE).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]), default="bfloat16", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
def merge(base, adapter, output, dtype, max_shard_size):
    """Merge a LoRA ADAPTER into BASE, streamed tensor by tensor (the delta is added in float32)."""
    from .merge import merge_lora
    from .run import local_model_dir

    res = merge_lora(local_model_dir(base), adapter, output, dtype=dtype, max_shard_size=max_shard_size)
    click.echo(f"merged {res['merged']} weights, copied {res['copied']} unchanged -> {os.path.abspath(output)} ({dtype})")


if __name__ == "__main__":
    main()
