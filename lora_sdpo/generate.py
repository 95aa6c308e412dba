"""What the models write: completions of prompts through the model's chat template.

`lora-sdpo generate` uses it on a model folder (or Hub id, with an optional adapter) or on a run
directory (S and M_t); the run itself uses `complete` for the samples of its report (samples.py),
on the models it has loaded anyway. Greedy unless a temperature is given; one prompt at a time, so
that a completion does not depend on which other prompts were asked with it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import normalise, read_file
from . import manifest
from .errors import EvalError, GenerateError
from .rundir import is_run_dir
from .targets import Target, load_model, model_target, run_targets


@dataclass
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    seed: int = 0


def prompt_ids(tokenizer, prompt: str | list[dict], room: int) -> list[int]:
    """Token ids of a prompt (text, or a list of {role, content} messages) through the chat template.

    Without a chat template the text is used as it is. A prompt longer than `room` tokens keeps its
    last `room` (the end holds the question and the assistant's turn)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    return list(ids)[-room:]


@torch.no_grad()
def complete(model, tokenizer, prompts: list, settings: Settings, streamer_for=None) -> list[str]:
    """The completion of each prompt (special tokens removed), generated one prompt at a time.

    `streamer_for(i)` may return a transformers streamer for prompt i (the terminal's live output)."""
    config = model.config
    room = max(1, (getattr(config, "max_position_embeddings", None) or 4096) - settings.max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen_kwargs = dict(max_new_tokens=settings.max_new_tokens, use_cache=True,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if settings.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    out = []
    try:
        for i, p in enumerate(prompts):
            ids = torch.tensor([prompt_ids(tokenizer, p, room)], device=device)
            if settings.temperature > 0:
                torch.manual_seed(settings.seed + i)  # each prompt's draw is reproducible on its own
            streamer = streamer_for(i) if streamer_for else None
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **gen_kwargs)
            out.append(tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def read_prompts(texts: tuple[str, ...], path: str | None) -> list:
    """The prompts of --prompt (each a text) and --prompts FILE: a .txt file (one prompt a line) or
    a .jsonl/.json file of rows whose `prompt` is a text or a message list, or any preference-pair
    format lora-sdpo reads (its prompt is taken)."""
    prompts: list = [t for t in texts if t.strip()]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GenerateError(f"--prompts {path}: no such file")
        if p.suffix.lower() == ".txt":
            try:
                prompts += [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                raise GenerateError(f"--prompts {path}: not UTF-8 text") from None
        else:
            for n, row in enumerate(read_file(p), 1):
                prompts.append(_row_prompt(row, f"--prompts {path}: row {n}", normalise))
    if not prompts:
        raise GenerateError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE (.txt, one prompt a line, or .jsonl)")
    return prompts


def _row_prompt(row, where: str, normalise):
    if isinstance(row, str):  # readers.BadRow: a CSV/TSV line that does not fit its header
        raise GenerateError(f"{where}: {row}")
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    if isinstance(row, dict) and isinstance(row.get("prompt"), list) and "chosen" not in row:
        return _messages(row["prompt"], where)
    fmt, pair, problem = normalise(row)
    if pair is None or problem:
        raise GenerateError(f"{where}: no prompt ({problem or 'unrecognised row'}); give rows with a `prompt` text or message list")
    return pair["prompt"]


def _messages(msgs: list, where: str) -> list[dict]:
    if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise GenerateError(f"{where}: `prompt` is not a list of {{role, content}} messages")
    return msgs


def targets(location: str, step: str | None, adapter: str | None) -> list[Target]:
    """The models to generate from: one model (folder or Hub id, optional adapter), or a run's S
    (step 0) and M_t; `step` is a number, `all`, or None (a run's last finished step)."""
    try:
        if not is_run_dir(location):
            if step is not None:
                raise GenerateError(f"--step applies to a run directory; {location} has no manifest.json")
            return [model_target(location, adapter)]
        if adapter is not None:
            raise GenerateError("--adapter applies to a model, not a run directory (a run's M_t already contain their adapters)")
        if step is None:
            done = [s.index for s in manifest.read(location).steps if s.status == "done"]
            step = str(done[-1]) if done else "0"
        elif step != "all" and not step.isdigit():
            raise GenerateError(f"--step {step}: write a step number (0 is the base S) or all")
        found, pruned = run_targets(location, step)
    except EvalError as e:
        raise GenerateError(str(e).replace("--steps", "--step")) from None
    return found


def generate(location: str, prompts: list, *, step: str | None, adapter: str | None, precision: str, compute_dtype: str,
             settings: Settings, stream=None, log=print) -> dict[str, list[str]]:
    """{model label: completions} of every model asked for, loaded one after another.

    `stream(label, i)` may return a transformers streamer for prompt i of that model."""
    out = {}
    for target in targets(location, step, adapter):
        log(f"{target.label}: {target.shown or target.path}" + (f" + adapter {target.adapter}" if target.adapter else "") + f" ({precision})")
        try:
            model, tokenizer = load_model(target, precision, compute_dtype)
        except EvalError as e:
            raise GenerateError(str(e)) from None
        out[target.label] = complete(model, tokenizer, prompts, settings,
                                     streamer_for=(lambda i, t=target, tok=tokenizer: stream(t.label, i, tok)) if stream else None)
        del model
        gc.collect()
    return out
