"""lora-sdpo: stepwise DPO (Kim et al. 2024, "Don't Use Your Data All at Once") on QLoRA."""

from . import noise as _noise

_noise.install()  # before anything imports bitsandbytes

__version__ = "0.1.0"
