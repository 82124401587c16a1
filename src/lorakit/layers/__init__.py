"""LoRA layers: the adapter delta and the adapted versions of common PyTorch layers."""

from .base import LoraLayer
from .conv import LoRAConv1d, LoRAConv2d, LoRAConv3d
from .embedding import LoRAEmbedding
from .linear import LoRALinear
from .lora import LoRA
from .registry import LINEAR_TYPES, LORA_CLASSES, lora_class

__all__ = [
    "LINEAR_TYPES",
    "LORA_CLASSES",
    "LoRA",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraLayer",
    "lora_class",
]
