"""qdpo: memory-efficient single-GPU DPO with a 4-bit base model and LoRA adapters.

import qdpo
result = qdpo.tune(preset="smoke", max_steps=16, callback=print)
result.summary["eval_rewards/accuracies"], result.metrics[-1]
"""

__version__ = "0.1.0"

import warnings  # noqa: E402

# tqdm.auto, imported by datasets and transformers, warns "IProgress not found" in a notebook without ipywidgets
# and then draws text bars anyway: nothing for the user to act on (qdpo's own bars pick text there themselves).
warnings.filterwarnings("ignore", message="IProgress not found")

from qdpo.api import tune  # noqa: E402  (named tune: qdpo.train is the training recipe's module)
from qdpo.config import Config  # noqa: E402
from qdpo.loss import dpo_loss  # noqa: E402

__all__ = ["Config", "dpo_loss", "tune", "__version__"]
