"""Save and load adapters in Hugging Face PEFT's format, atomically and with checks first.

folder/adapter_config.json           PEFT's keys only
folder/adapter_model.safetensors     PEFT's tensor keys; lorakit's extras in the header metadata
folder/<name>/...                    an adapter not named "default" (PEFT's layout)

`save.py` writes, `load.py` reads and loads; this module only names what they offer.
"""

from .files import adapter_folder
from .load import LoadOptions, from_pretrained, load_adapter, read_adapter
from .save import save_adapter
from .validate import META_FINGERPRINT, META_VERSION, fingerprint

__all__ = [
    "META_FINGERPRINT",
    "META_VERSION",
    "LoadOptions",
    "adapter_folder",
    "fingerprint",
    "from_pretrained",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]
