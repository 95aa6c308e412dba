"""report.md and its plots, rebuilt from a run directory's manifest and metrics alone."""

from __future__ import annotations

import io
from pathlib import Path

from .audit import contamination_note
from .diagnostics import paired_differences
from .errors import RunError
from .harness import results_table
from . import manifest
from .manifest import GammaMatrix, Manifest, PairedDifference, StepRecord
from .rundir import RunDir, atomic_write_bytes, atomic_write_text, read_jsonl
from .samples import report_section
from .targets import fingerprint_from_manifest


def fmt_number(x, digits=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def retention_text(step: StepRecord) -> str:
    d = step.retention_detail
    if d is None or d.retention is None:
        return "n/a"
    text = f"{d.retention:.2f}"
    return text if d.reliable else text + " (gain within noise)"


def summary_rows(m: Manifest) -> list[list[str]]:
    rows = []
    for s in m.steps:
        if s.status != "done":
            rows.append([str(s.index), s.status] + [""] * 7)
            continue
        rows.append(
            [
                str(s.index),
                s.reference,
                str(s.rows),
                fmt_number(s.first_loss, 4),
                fmt_number(s.last_loss, 4),
                fmt_number(s.reward_accuracy, 2),
                gamma_ref_text(s),
                retention_text(s),
                f"{s.timings['total']:.0f}s",
            ]
        )
    return rows


SUMMARY_HEADER = ["step", "reference", "pairs", "first loss", "last loss", "reward acc", "gamma_ref ± s.e. (n)", "retention", "time"]


def plus_minus(mean, se, digits=2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def gamma_ref_text(step: StepRecord) -> str:
    """The reference's mean gamma over all of D_t (TRL's reference pass covers every pair), its s.e. and n."""
    n, mean, std = step.rows, step.gamma_ref_mean, step.gamma_ref_std
    se = std / n**0.5 if std is not None and n and n > 1 else None
    return f"{plus_minus(mean, se)} (n={n})"


SETTINGS_SHOWN = ("loss_type", "beta", "learning_rate", "num_train_epochs", "warmup_ratio", "lr_scheduler_type")


def settings_table(m: Manifest) -> tuple[list[str], list[list[str]]]:
    """Each done step's effective training settings: the usual ones and every key that differs between steps."""
    steps = [s for s in m.steps if s.training]
    if not steps:
        return [], []
    keys = list(SETTINGS_SHOWN) + sorted(
        k for k in steps[0].training if k not in SETTINGS_SHOWN and len({repr(s.training.get(k)) for s in steps}) > 1
    )
    rows = [[str(s.index)] + [_fmt_setting(s.training.get(k)) for k in keys] for s in steps]
    return ["step"] + keys, rows


def _fmt_setting(v) -> str:
    if isinstance(v, list):
        return " + ".join(str(x) for x in v)
    return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def matrix_table(m: Manifest) -> tuple[list[str], list[list[str]]]:
    """Mean ± standard error of each model's gamma on each dataset's sample; a contaminated eval says so."""
    gm = m.gamma_matrix or GammaMatrix()
    cells = {model: [gm.rows[model].get(d) for d in gm.sample] for model in gm.rows}
    out = [[model] + [plus_minus(c.mean, c.se) if c is not None else "n/a" for c in cs] for model, cs in cells.items()]
    dirty = contamination_note(m) is not None
    return ["model"] + [f"{d} (n={n}{', CONTAMINATED' if d == 'eval' and dirty else ''})" for d, n in gm.sample.items()], out


PAIRED_HEADER = ["step", "reference", "data", "n", "gamma_ref - gamma_S ± s.e.", "share > 0"]


def paired_table(paired: list[PairedDifference]) -> list[list[str]]:
    rows = []
    for p in paired:
        if p.step == 1:
            cells = ["-", "0 (the reference is S)", "-"]
        elif p.n is None:
            cells = ["-", "n/a (no per-pair gammas)", "-"]
        else:
            cells = [str(p.n), plus_minus(p.mean, p.se), fmt_number(p.frac_positive, 2)]
        rows.append([str(p.step), p.reference, p.data, *cells])
    return rows


def overlap_section(m: Manifest) -> list[str]:
    """The overlap audit of the run (lora_sdpo.audit), as recorded in the manifest."""
    ov = m.overlap
    if ov is None:
        return []
    lines = ["\n## Data overlap\n"]
    if not ov.overlaps:
        return lines + ["No pair and no prompt is shared between any two steps, or between a step and the held-out set "
                        "(normalised pairs compared by hash).\n"]
    lines.append(md_table(["data", "also in", "same pairs", "same prompt, other completions", "first rows (this = there)"], [
        [o.b, o.a, str(o.exact), str(o.prompt),
         "; ".join(f"{b} = {a}" for b, a in (o.exact_rows + o.prompt_rows)[:3])] for o in ov.overlaps]))
    note = contamination_note(m)
    lines.append("\nA step whose data overlaps an earlier step's has a reference that trained on those pairs (Kim et al. "
                 "2024, sec. 4.2)." + (f" **{note}**: its column measures pairs a model trained on." if note else "") + "\n")
    return lines


def tokens_section(m: Manifest) -> list[str]:
    """What training put through the backbone, against TRL's padded two-row layout on the same batches."""
    rows = []
    for s in m.steps:
        t = s.tokens or {}
        if s.status != "done" or not t.get("two_row"):
            continue
        path = "pair forward" if s.prefix_sharing else "TRL two-row"
        rows.append([str(s.index), path, f"{t['backbone']:,}", f"{t['two_row']:,}", f"{t['completion']:,}",
                     f"{t['backbone'] / t['two_row']:.2f}x", f"{t['completion'] / t['two_row']:.2f}x"])
    if not rows:
        return []
    return [
        "\n## Tokens of training\n",
        md_table(["step", "forward", "backbone", "TRL two-row", "completion", "backbone / two-row", "LM head / two-row"], rows),
        "\nbackbone: tokens the training forwards put through the decoder layers; TRL two-row: what TRL's layout "
        "(chosen and rejected as two rows, each with the prompt, padded to the batch's longest) puts through them for "
        "the same batches; completion: the tokens the LM head scores on the pair forward (TRL's head scores every "
        "two-row position off CUDA). training.prefix_sharing chooses the forward.\n",
    ]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def read_metrics(run: RunDir, index: int) -> list[dict]:
    return [m for m in read_jsonl(run.metrics_path(index)) if "loss" in m]


def plot_curves(run: RunDir, m: Manifest, path: Path) -> bool:
    """Loss, reward accuracy and margin of every step on one axis of optimizer updates (paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(s.index, read_metrics(run, s.index)) for s in m.steps]
    if not any(metrics for _, metrics in series):
        return False
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    offset = 0
    for index, metrics in series:
        xs = [offset + row["step"] for row in metrics]
        for ax, key in zip(axes, ("loss", "rewards/accuracies", "rewards/margins")):
            ax.plot(xs, [row.get(key) for row in metrics], marker=".", label=f"step {index}")
        if metrics:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", lw=0.5, ls=":")
            offset = xs[-1]
    if all((s.training or {}).get("loss_type", "sigmoid") == "sigmoid" for s in m.steps):
        axes[0].axhline(0.693147, color="grey", lw=0.8, ls="--", label="ln 2")  # sigmoid's value at zero margin
    for ax, title in zip(axes, ("DPO loss", "reward accuracy", "reward margin")):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("optimizer update (all steps on one axis)")
    fig.suptitle("sDPO training curves")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def plot_matrix(m: Manifest, path: Path, paired: list[PairedDifference] | None = None) -> bool:
    """Mean gamma ± s.e. of each reference on each dataset (paper Fig. 2) as a heatmap, and below it
    the paired differences M_{t-1} - S on D_t with their standard errors."""
    header, rows = matrix_table(m)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gm = m.gamma_matrix
    models, data = list(gm.rows), list(gm.sample)
    cells = [[gm.rows[model].get(d) for d in data] for model in models]
    values = [[(c.mean if c is not None else None) or 0.0 for c in r] for r in cells]
    paired = [p for p in (paired or []) if p.n]
    width = 2.4 + 1.6 * len(data)
    if paired:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(width, 2.6 + 0.6 * len(models) + 0.4 * len(paired)),
                                      gridspec_kw={"height_ratios": [len(models) + 1, len(paired) + 1]})
    else:
        fig, ax = plt.subplots(figsize=(width, 1.4 + 0.6 * len(models)))
    top = max(abs(v) for r in values for v in r) or 1
    im = ax.imshow(values, cmap="RdBu", aspect="auto", vmin=-top, vmax=top)
    labels = header[1:]
    ax.set_xticks(range(len(data)), labels, fontsize=8)
    ax.set_yticks(range(len(models)), models)
    for i, r in enumerate(cells):
        for j, c in enumerate(r):
            ax.text(j, i, plus_minus(c.mean, c.se, 1) if c is not None else "n/a", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="mean gamma")
    ax.set_title("mean gamma ± s.e. = log p(chosen) - log p(rejected)", fontsize=10)
    if paired:
        ys = range(len(paired))
        ax2.errorbar([p.mean for p in paired], ys, xerr=[p.se or 0.0 for p in paired], fmt="o", capsize=4)
        ax2.axvline(0, color="grey", lw=0.8, ls="--")
        ax2.set_yticks(ys, [f"step {p.step}: {p.reference} - S on {p.data} (n={p.n})" for p in paired], fontsize=8)
        ax2.set_xlabel("paired difference of gamma, mean ± 1 s.e.", fontsize=9)
        ax2.invert_yaxis()
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def eval_section(m: Manifest) -> list[str]:
    """The paper's Table 2 for this run: H4 and each task per model, from `lora-sdpo eval`."""
    models = m.eval.models if m.eval else {}
    if not models:
        return []
    # A step redone after its evaluation (a damaged step is redone on resume) has new weights.
    stale = {f"M_{s.index}" for s in m.steps if f"M_{s.index}" in models and s.model_files
             and fingerprint_from_manifest(s.model_files) != models[f"M_{s.index}"].get("fingerprint")}
    header, rows, notes = results_table(models, stale)
    settings = sorted({f"{r.get('precision')}, lm-eval {r.get('lm_eval')}" for r in models.values()})
    h4 = ("H4 is the mean of ARC, HellaSwag, MMLU and TruthfulQA as the Open LLM Leaderboard v1 scored them "
          "(Kim et al. 2024, Table 2). ") if "H4" in header else ""
    return [
        "\n## Benchmarks (lm-evaluation-harness)\n",
        md_table(header, rows),
        f"\nScores x 100 ± standard error. {h4}Weights as evaluated: {'; '.join(settings)}.\n",
        *[f"- {n}" for n in notes],
    ]


def build_report(root: Path) -> Path:
    run = RunDir(Path(root))
    m = manifest.read(run)
    if m is None:
        raise RunError(f"{root}: no manifest.json; not a lora-sdpo run directory")
    curves = plot_curves(run, m, run.root / "curves.png")
    paired = [PairedDifference.model_validate(p) for p in paired_differences(run.root, m)] if m.gamma_matrix else []
    heat = plot_matrix(m, run.root / "gamma_matrix.png", paired)
    parts = [
        f"# sDPO run report\n\nRecipe: `recipe.toml` (settings sha256 `{m.recipe_sha256[:12]}`), base model "
        f"`{m.base_model}`, status **{m.status}**.\n",
        "## Steps\n",
        md_table(SUMMARY_HEADER, summary_rows(m)),
        "\nfirst loss: the DPO loss of the first optimizer update (for the sigmoid loss ln 2 = 0.6931 when the "
        "reference is the step's starting model). reward acc: TRL's reward accuracy averaged over the last quarter of the step's updates. "
        "gamma_ref: mean gamma of the step's reference over all n pairs of D_t (TRL's reference pass), ± its standard "
        "error; the gamma matrix below measures the same reference on only the first pairs of D_t (its n), so the two "
        "differ by sampling. retention: the share of the adapter's gamma gain kept by NF4(M_t) after the merge.\n",
    ]
    for s in m.steps:
        if s.status == "done":
            parts.append(f"- step {s.index}: " + "; ".join(s.sources))
    header, rows = settings_table(m)
    if rows:
        parts += ["\n## Training settings of each step\n", md_table(header, rows),
                  "\n[training] with each step's [steps.training] overrides, as the step ran (manifest `training`). "
                  "The first loss at zero margin depends on the loss: ln 2 for sigmoid, 1 for hinge, (1/(2 beta))^2 for ipo.\n"]
    header, rows = matrix_table(m)
    if rows:
        parts += [
            "\n## Reference diagnostics: mean gamma of each model on each dataset\n",
            md_table(header, rows),
            "\nMean ± standard error over the first n pairs of each dataset (diagnostics.gamma_sample). The paper "
            "(Kim et al. 2024, Fig. 2) expects the reference's gamma on the next step's data to rise step "
            "by step, and a model's gamma on data it trained on to be far higher (a reference that saw the data).\n",
        ]
        if contamination_note(m):
            parts.append(f"**{contamination_note(m)}**: that column is not a held-out measurement.\n")
        if len(paired) > 1:
            parts += [
                "\n### Each step's reference against S, on the same pairs\n",
                md_table(PAIRED_HEADER, paired_table(paired)),
                "\nThe paper's comparison (Fig. 2): gamma of step t's reference M_{t-1} minus gamma of S, pair by pair on "
                "D_t's sample. Pairing removes what the two models share (how hard each pair is), most of gamma's "
                "spread, so its standard error is far smaller than the cells'. share > 0: the pairs where the reference "
                "sets the stricter bound.\n",
            ]
        if heat:
            parts.append("![gamma matrix](gamma_matrix.png)\n")
    parts += tokens_section(m)
    parts += overlap_section(m)
    parts += eval_section(m)
    parts += report_section(run.root)
    if curves:
        parts += ["\n## Training curves\n", "![curves](curves.png)\n"]
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def _rich_table(title: str, header: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    return table


def print_summary(m: Manifest, console) -> None:
    console.print(_rich_table("sDPO steps", SUMMARY_HEADER, summary_rows(m)))
    header, rows = matrix_table(m)
    if rows:
        console.print(_rich_table("mean gamma ± s.e. of each model on each dataset", header, rows))
        if contamination_note(m):
            console.print(f"[yellow]{contamination_note(m)}[/]", soft_wrap=True)
    paired = m.gamma_matrix.paired if m.gamma_matrix else []
    if rows and paired and len(paired) > 1:
        console.print(_rich_table("each step's reference minus S, paired on D_t's sample", PAIRED_HEADER, paired_table(paired)))
