"""Fine-tuning support for ``lorakit finetune``: data loading, demo data and the training loop.

    from lorakit.train import TrainOptions, finetune
    result = finetune(TrainOptions(model="path/to/model", data="train.jsonl", out="runs/x"))

`finetune` is the whole job (model + data -> adapter, metrics, plot, summary); `train` is the
loop alone, for a model you have already adapted with `lorakit.inject`.
"""

from .data import DataError
from .distributed import DistEnv
from .divergence import TrainingError
from .evaluate import evaluate
from .finetune import FinetuneResult, finetune
from .grad_checkpoint import enable_gradient_checkpointing
from .loop import TrainResult, train
from .options import TrainOptions
from .recipes import recipe_job
from .schedule import WarmupDecay
from .state import latest_checkpoint

__all__ = [
    "DataError",
    "DistEnv",
    "FinetuneResult",
    "TrainOptions",
    "TrainResult",
    "TrainingError",
    "WarmupDecay",
    "enable_gradient_checkpointing",
    "evaluate",
    "finetune",
    "latest_checkpoint",
    "recipe_job",
    "train",
]
