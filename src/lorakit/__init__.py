"""lorakit: Low-Rank Adaptation for PyTorch models. y = W x + (alpha / rank) * B(A x)."""

from . import optim
from ._version import __version__
from .adapters import active_adapters, adapter_names, delete_adapter, set_active
from .algebra import LayerCompression, combine, compress
from .algebra_files import compress_adapter
from .checkpoint import from_pretrained, load_adapter, save_adapter
from .config import LoraConfig
from .errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    LorakitError,
    MergeError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from .functional import delta_weight
from .inject import inject
from .layers import LoRA, LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAEmbedding, LoraLayer, LoRALinear
from .loftq import loftq_init
from .merge import disabled, merge, merge_and_requantize, merge_and_unload, unload, unmerge
from .overview import (
    InjectionReport,
    print_trainable_parameters,
    summary,
    trainable_parameters,
)
from .routing import routing
from .seed import build, lora_delta, output_size, wrap
from .tree import lora_layers

__all__ = [
    "__version__",
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "InjectionReport",
    "LayerCompression",
    "LoRA",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraConfig",
    "LoraLayer",
    "LorakitError",
    "MergeError",
    "TargetNotFoundError",
    "UnsupportedLayerError",
    "active_adapters",
    "adapter_names",
    "build",
    "combine",
    "compress",
    "compress_adapter",
    "delete_adapter",
    "delta_weight",
    "disabled",
    "from_pretrained",
    "inject",
    "load_adapter",
    "loftq_init",
    "lora_delta",
    "lora_layers",
    "merge",
    "optim",
    "merge_and_requantize",
    "merge_and_unload",
    "output_size",
    "print_trainable_parameters",
    "routing",
    "save_adapter",
    "set_active",
    "summary",
    "trainable_parameters",
    "unload",
    "unmerge",
    "wrap",
]
