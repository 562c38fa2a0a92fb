"""Fine-tuning with WeMask on every training forward (SFT, DPO, GRPO on TRL + peft)."""

from melayer.finetune.config import FinetuneConfig
from melayer.finetune.train import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
