"""qdpo: memory-efficient single-GPU DPO with a 4-bit base model and LoRA adapters."""

__version__ = "0.1.0"

from qdpo.config import Config  # noqa: E402
from qdpo.loss import dpo_loss  # noqa: E402

__all__ = ["Config", "dpo_loss", "__version__"]
