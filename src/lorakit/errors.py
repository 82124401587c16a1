"""lorakit's exceptions: each subclasses ValueError, TypeError or ImportError, and names the
field at fault (or the package to install)."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """An option has an invalid value; the message names the option and the value."""


class UnsupportedLayerError(LorakitError, TypeError):
    """A layer type that LoRA cannot adapt (or not with the options given)."""


class TargetNotFoundError(LorakitError, ValueError):
    """The target patterns matched no module of the model."""


class AdapterError(LorakitError, ValueError):
    """An adapter name is unknown, duplicated, or used in a state that forbids the call."""


class MergeError(LorakitError, ValueError):
    """Merging would write NaN or inf into a base weight, change a weight tied to another
    module, or round an adapter into a quantized (4-bit / 8-bit) weight."""


class CheckpointError(LorakitError, ValueError):
    """An adapter file or folder is missing, corrupt, or does not fit the model."""


class MissingDependencyError(LorakitError, ImportError):
    """An optional package a feature needs is not installed; the message names the pip command."""
