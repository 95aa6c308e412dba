"""Fetching a model: a local folder as it is, or a snapshot of a Hub repo's safetensors and configs.

The other direction, pushing an export to the Hub, is hub.py. Models are read from safetensors
only. Light on purpose (huggingface_hub is imported only to download): `merge`, `push`, the report
and the recipe checks resolve models without the training stack.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError
from .locations import no_model_folder


def local_model_dir(location: str, revision: str | None = None) -> Path:
    """A model as a local folder: the folder itself, a GGUF file's float32 dequantisation, or a snapshot of the Hub repo's safetensors and configs."""
    p = Path(location).expanduser()
    if p.is_dir():
        return check_safetensors(p.resolve())
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf_import import base_from_gguf  # dequantised once, cached by the file's sha256

        return base_from_gguf(p)
    problem = no_model_folder(location)
    if problem:
        raise ModelError(problem)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                location,
                revision=revision,
                allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.md", "LICENSE*"],
            )
        )
    except Exception as e:  # offline, missing repo, gated repo: all mean "cannot get it here"
        raise ModelError(
            f"model {location!r} is not a local folder and cannot be fetched from the Hub "
            f"({type(e).__name__}). Without network access (HF_HUB_OFFLINE=1) download it first "
            "and give the folder."
        ) from None
    return check_safetensors(folder, hub_id=location)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors(folder: Path, hub_id: str | None = None) -> Path:
    """Models are read from safetensors only: pickle weights can run code when they are loaded."""
    if any(folder.glob("*.safetensors")) or not (folder / "config.json").exists():
        return folder  # a model with safetensors, or not a model folder (its own loader will say so)
    pickles = sorted(f.name for pat in PICKLE_WEIGHTS for f in folder.glob(pat))
    where = f"Hub repo {hub_id!r}" if hub_id else f"model folder {folder}"
    raise ModelError(
        f"{where} has no safetensors weights{' (only ' + ', '.join(pickles[:3]) + ')' if pickles else ''}. lora-sdpo loads "
        "safetensors only, because pickle weights can run code when loaded. Convert the model once in a trusted "
        "environment (load it with transformers and save_pretrained(..., safe_serialization=True)) and point at that folder"
    )
