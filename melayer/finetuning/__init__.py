"""Fine-tuning with WeMask on every training forward (SFT, DPO, GRPO on TRL + peft)."""

from melayer.finetuning.config import FinetuneConfig
from melayer.finetuning.train import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
