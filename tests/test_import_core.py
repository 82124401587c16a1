"""`import lorakit` with only the core dependencies (torch, safetensors): transformers blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Runs in a fresh interpreter: a meta-path finder makes every `transformers` import fail.
SCRIPT = textwrap.dedent(
    """
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "transformers":
                raise ImportError(f"{name} is blocked for this test")

    sys.meta_path.insert(0, Blocked())
    import torch
    from torch import nn

    import lorakit

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    trained = model()
    lorakit.inject(trained, lorakit.LoraConfig(rank=2, targets=("0", "2")))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora" in name:
                p.normal_()  # B starts at zero; make the adapter change the output
    lorakit.save_adapter(trained, sys.argv[1])
    loaded = lorakit.from_pretrained(model(), sys.argv[1])
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), trained(x))
    assert not torch.allclose(model()(x), trained(x))
    assert "transformers" not in sys.modules
    print("core ok")
    """
)


def test_import_inject_save_load_without_transformers(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "adapter")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "core ok"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_the_block_really_blocks() -> None:
    # The same finder must make a plain `import transformers` fail, or the test above proves
    # nothing.
    probe = SCRIPT.split("import torch", 1)[0] + "import transformers\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode != 0 and "transformers is blocked" in done.stderr
