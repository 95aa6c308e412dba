"""The model card (README.md) of an export: Hub metadata, what the weights are, the steps, the recipe.

Everything in it comes from the run directory (manifest.json, recipe.toml, the adapters' configs,
the base's own card); nothing comes from the environment, so no token or local secret can reach it.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from huggingface_hub import ModelCardData

from .manifest import Manifest

HUB_CACHE_PATH = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_identity(run_dir: Path, m: Manifest) -> tuple[str | None, str]:
    """(Hub id of S or None when S is a local folder, a display name for S).

    The recipe's model.path may be relative to a recipe that is elsewhere; the step-1 adapter's
    config records where S was actually loaded from (a Hub cache snapshot or a local folder).
    """
    seen = m.base_model or ""
    cfg_path = Path(run_dir) / "step-1" / "adapter" / "adapter_config.json"
    loaded = ""
    if cfg_path.exists():
        loaded = json.loads(cfg_path.read_text()).get("base_model_name_or_path") or ""
    hit = HUB_CACHE_PATH.search(loaded)
    if hit:
        return f"{hit.group(1)}/{hit.group(2)}", f"{hit.group(1)}/{hit.group(2)}"
    if HUB_ID.match(seen) and not Path(loaded or seen).is_absolute() and not Path(seen).exists():
        return seen, seen
    return None, Path(loaded or seen).name or seen


def base_license(model_dir: Path | None) -> str | None:
    """The licence the base declares in its card's YAML (`license:`), when there is one."""
    from huggingface_hub.repocard import metadata_load

    card = Path(model_dir) / "README.md" if model_dir is not None else None
    if card is None or not card.exists():
        return None
    try:
        meta = metadata_load(card) or {}
    except Exception:  # a malformed card of the base says nothing reliable about its licence
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def hub_datasets(recipe_text: str) -> list[str]:
    """Hub dataset ids the recipe trained on (local files have no id and are listed in the body)."""
    recipe = tomllib.loads(recipe_text)
    out = []
    for step in recipe.get("steps", []):
        for src in step.get("sources", []):
            if src.get("dataset") and src["dataset"] not in out:
                out.append(src["dataset"])
    return out


def _num(x, digits=4) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def step_table(m: Manifest, upto: int) -> str:
    rows = [
        "| step | data | rows | reference | mean gamma_ref | retention | final loss | reward accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in m.steps[:upto]:
        ret = _num(s.retention, 2)
        if s.retention_detail is not None and not s.retention_detail.reliable and s.retention is not None:
            ret += " (gain within noise: not meaningful)"
        rows.append(
            f"| {s.index} | {_cell('; '.join(s.sources or []))} | {'n/a' if s.rows is None else s.rows} | "
            f"{s.reference or s.reference_label} | {_num(s.gamma_ref_mean, 2)} | "
            f"{ret} | {_num(s.last_loss)} | {_num(s.reward_accuracy, 2)} |"
        )
    return "\n".join(rows)


def _base_line(hub_id: str | None, base_name: str) -> str:
    return f"`{hub_id}` on the Hugging Face Hub" if hub_id else f"a local model folder `{base_name}` (not on the Hub)"


def _front_matter(hub_id: str | None, licence: str | None, recipe_text: str, library: str, tags: list[str]) -> list[str]:
    """The card's YAML block: base model, library, licence, datasets, tags."""
    meta: dict = {}
    if hub_id:
        meta["base_model"] = hub_id
    meta["library_name"] = library
    if licence:
        meta["license"] = licence
    datasets = hub_datasets(recipe_text)
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    return ["---", ModelCardData(**meta).to_yaml().strip(), "---"]


def _recipe_and_versions(recipe_text: str, m: Manifest) -> list[str]:
    return ["## Recipe", "", "```toml", recipe_text.strip(), "```", "", "## Versions", "",
            ", ".join(f"{k} {v}" for k, v in (m.versions or {}).items()), ""]


def model_card(
    run_dir: Path,
    m: Manifest,
    recipe_text: str,
    step: int,
    what: str,
    dtype: str | None,
    licence: str | None,
    repo_id: str | None = None,
) -> str:
    """README.md of an export of step `step` (1-based): `what` is "merged" or "adapter"."""
    hub_id, base_name = base_identity(run_dir, m)
    total = len(m.steps)
    qlora = (m.adapter or {}).get("quantization", "nf4") == "nf4"
    tags = ["sdpo", "dpo", "lora"] + (["qlora"] if qlora else []) + ["trl", "lora-sdpo"]
    where = repo_id or "PATH_OR_REPO_ID"  # this folder, or the Hub repo it is uploaded to
    ad = m.adapter or {}
    base_line = _base_line(hub_id, base_name)

    parts = [*_front_matter(hub_id, licence, recipe_text, "peft" if what == "adapter" else "transformers", tags), ""]
    if what == "merged":
        parts += [
            f"# {base_name} + sDPO, step {step} of {total} (merged)",
            "",
            f"M_{step} of a stepwise DPO run (sDPO, Kim et al. 2024, \"Don't Use Your Data All at Once\") made with "
            f"lora-sdpo. S, the SFT base, is {base_line}. Step t trained a fresh "
            f"{'QLoRA (NF4 base)' if qlora else 'LoRA'} adapter A_t with DPO against M_{{t-1}} as the reference and "
            f"merged it in float32: M_t = M_{{t-1}} + (alpha/r) B_t A_t, M_0 = S. These weights are M_{step} = S + "
            f"{' + '.join(f'dW_{i}' for i in range(1, step + 1))}, stored in {dtype} "
            "(the chain itself was kept in float32).",
            "",
            "## How to load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}", dtype="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "```",
        ]
    else:
        earlier = "the adapter of step 1" if step == 2 else f"the adapters of steps 1..{step - 1}"
        start = (hub_id or "S_DIR") if step == 1 else f"M_{step - 1}"
        start_note = f"your copy of S, `{base_name}`" if step == 1 else f"the folder of M_{step - 1}, see above"
        prev = "S itself" if step == 1 else f"M_{step - 1} (S with {earlier} merged in)"
        parts += [
            f"# {base_name} + sDPO, adapter of step {step} of {total}",
            "",
            f"The LoRA adapter A_{step} of a stepwise DPO run (sDPO, Kim et al. 2024) made with lora-sdpo "
            f"(r {ad.get('r', '?')}, alpha {ad.get('alpha', '?')}, on {', '.join(ad.get('target_modules') or [])}). "
            f"S, the SFT base, is {base_line}.",
            "",
            (f"**It applies to M_{step - 1}, not to S.** Step {step} trained it on top of {prev}; loaded on any "
             "other model it computes something that was never trained.")
            if step > 1
            else "It applies to S itself (M_0 = S): step 1 trained it on top of the base.",
        ]
        if step > 1:
            parts += [
                "",
                f"Where M_{step - 1} comes from: it is the merged model of step {step - 1} of the same run "
                f"(`lora-sdpo export RUN_DIR --step {step - 1} --what merged`). This folder also carries {earlier} "
                f"(`previous_adapters/`), so M_{step - 1} can be rebuilt from S in float32"
                + ("" if hub_id else f" (S_DIR: your copy of `{base_name}`)")
                + ":",
                "",
                "```bash",
                *[
                    f"lora-sdpo merge {(hub_id or 'S_DIR') if i == 1 else f'M_{i - 1}'} previous_adapters/step-{i} --output M_{i} --dtype float32"
                    for i in range(1, step)
                ],
                "```",
            ]
        parts += [
            "",
            "## How to load",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{start}", dtype="auto")'
            + ("" if hub_id and step == 1 else f"  # {start_note}"),
            f'model = PeftModel.from_pretrained(base, "{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "```",
            "",
            f"To merge it: `lora-sdpo merge {start} {where} --output M_{step}` "
            "(streamed, float32 sum).",
        ]
    parts += [
        "",
        "## Steps",
        "",
        "gamma = log p(chosen|x) - log p(rejected|x); mean gamma_ref is the reference's on its step's data. Retention "
        "is the share of the adapter's gamma gain that survived the merge and NF4 re-quantisation. Final loss and "
        "reward accuracy are TRL's, at the end of the step.",
        "",
        step_table(m, step),
        "",
        f"Run status: {m.status}, {total} step(s) in the recipe; this export is step {step}.",
        "",
        "## Base model and licence",
        "",
        f"S: {base_line}. "
        + (f"Licence (from the base's card): {licence}." if licence else "The base declares no licence in its card; check its source before sharing."),
        "",
        *_recipe_and_versions(recipe_text, m),
    ]
    return "\n".join(parts)


def gguf_card(run_dir: Path, m: Manifest, recipe_text: str, step: int, quant: str, file_name: str, licence: str | None) -> str:
    """README.md of a GGUF export of step `step`: how llama.cpp, Ollama and transformers load the file."""
    hub_id, base_name = base_identity(run_dir, m)
    total = len(m.steps)
    base_line = _base_line(hub_id, base_name)
    what = {"f16": "float16 (1-D tensors float32)", "q8_0": "8-bit q8_0 blocks (1-D tensors float32)"}[quant]
    return "\n".join([
        *_front_matter(hub_id, licence, recipe_text, "gguf", ["sdpo", "dpo", "lora", "gguf", "llama.cpp", "lora-sdpo"]), "",
        f"# {base_name} + sDPO, step {step} of {total} (GGUF, {quant})", "",
        f"M_{step} of a stepwise DPO run (sDPO, Kim et al. 2024) made with lora-sdpo, as one GGUF file for llama.cpp "
        f"and Ollama: `{file_name}`, weights in {what}, written from the run's float32 M_{step}. S, the SFT base, is "
        f"{base_line}. The tokenizer, its special tokens and the chat template are in the file.", "",
        "## llama.cpp", "",
        "```bash",
        f"llama-cli -m {file_name} -cnv --jinja  # chat, rendering the embedded chat template as transformers does",
        f"llama-server -m {file_name} --jinja    # an OpenAI-compatible server",
        "```", "",
        "## Ollama", "",
        "```bash",
        "ollama create sdpo -f Modelfile",
        "ollama run sdpo",
        "```", "",
        "## transformers", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{file_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{file_name}")',
        "```", "",
        "## Steps", "",
        step_table(m, step), "",
        *_recipe_and_versions(recipe_text, m),
    ])
