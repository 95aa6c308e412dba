"""Whether a model location names a local folder or a Hub id (no heavy imports: the recipe uses it)."""

from __future__ import annotations

from pathlib import Path


def names_local_path(location: str) -> bool:
    """A model location meant as a local folder, never a Hub id: it starts with `.`, `/` or `~`, or is a file."""
    return str(location).startswith((".", "/", "~")) or Path(location).expanduser().is_file()


def no_model_folder(location: str | Path) -> str | None:
    """The problem with a location that names a local folder which is not there; None when there is none."""
    p = Path(location).expanduser()
    if p.is_dir() or not names_local_path(str(location)):
        return None
    if p.is_file() and p.suffix.lower() == ".gguf":
        return None  # a GGUF model file: dequantised to a float32 folder when it is used (gguf_import.py)
    if p.is_file():
        return f"no model folder at {p}: it is a file; give the folder that holds config.json and the *.safetensors weights, or a .gguf file"
    return (f"no model folder at {p}; check the path (a path starting with '.', '/' or '~' is read as a local folder, "
            "a Hub model id has the form OWNER/NAME)")
