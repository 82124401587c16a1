"""lorakit's version is written once (`lorakit/_version.py`) and read the same everywhere."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors import safe_open
from torch import nn

import lorakit
from lorakit.checkpoint.validate import META_VERSION

SRC = Path(lorakit.__file__).parent


def _saved(folder: Path) -> Path:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("0", "2")))
    return lorakit.save_adapter(model, folder)


def test_a_saved_adapter_carries_the_package_version(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "adapter")
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        saved = f.metadata()[META_VERSION]
    assert saved == lorakit.__version__ == importlib.metadata.version("lorakit")


def test_the_version_is_the_one_in_version_py() -> None:
    from lorakit._version import __version__

    assert lorakit.__version__ is __version__


# A bare `lorakit` package (no __init__ run, so no __version__ on it): saving still works only
# when the checkpoint code takes the version from `lorakit._version`, not the package root.
_BARE_ROOT = textwrap.dedent(
    """
    import sys, types
    from torch import nn

    root = types.ModuleType("lorakit")
    root.__path__ = [sys.argv[1]]
    sys.modules["lorakit"] = root

    from lorakit.checkpoint import save_adapter
    from lorakit.config import LoraConfig
    from lorakit.inject import inject

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    inject(model, LoraConfig(rank=2, targets=("0", "2")))
    save_adapter(model, sys.argv[2])
    assert not hasattr(root, "__version__"), "the package root's __init__ ran"
    print("saved")
    """
)


def test_checkpoint_code_does_not_import_the_package_root(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BARE_ROOT, str(SRC), str(tmp_path / "adapter")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "saved"
