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
    warn = loaded.recipe.retention.warn_below
    for s in manifest["steps"]:
        d = s["retention_detail"]
        if d["reliable"] and d["retention"] is not None and d["retention"] < warn:
            console.print(f"[yellow]warning: step {s['index']} kept only {d['retention']:.2f} of its gamma gain after the merge (< {warn})[/]")
    console.print(f"run complete: {loaded.output_dir(output)}")


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
