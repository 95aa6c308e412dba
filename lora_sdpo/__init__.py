"""lora-sdpo: stepwise DPO (Kim et al. 2024, "Don't Use Your Data All at Once") on QLoRA."""

__version__ = "0.1.0"
