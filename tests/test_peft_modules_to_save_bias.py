"""PEFT's file for `modules_to_save` + `bias="all"` also holds the wrapper's copies of the saved
layer's bias (`X.modules_to_save.bias`, `X.original_module.bias`): lorakit loads it to PEFT's
outputs, and keys of that shape that are not such copies stay errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import CheckpointError

WEIGHTS = "adapter_model.safetensors"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


@pytest.fixture()
def peft_folder(tmp_path):
    """(base, PEFT model, folder) with every trainable tensor moved off its start."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = MLP()
    config = LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], bias="all",
                        init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.rand_like(p))
    peft_model.save_pretrained(tmp_path)
    return base, peft_model, tmp_path


def test_the_file_holds_the_wrapper_copies_and_loads_to_peft_outputs(peft_folder) -> None:
    base, peft_model, folder = peft_folder
    keys = set(load_file(folder / WEIGHTS))
    assert {"base_model.model.lin1.modules_to_save.bias",
            "base_model.model.lin1.original_module.bias"} <= keys  # fmt: skip
    x = torch.randn(4, 10)
    model = lorakit.load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(model(x), peft_model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("rename", "unexpected"),
    [  # a wrapper-shaped key without the layer's own tensor, or on a layer not saved in full
        ({"base_model.model.lin1.bias": None}, "lin1.modules_to_save.bias"),
        ({"base_model.model.lin1.original_module.bias":
          "base_model.model.lin0.original_module.bias"}, "lin0.original_module.bias"),
    ],
)
def test_keys_of_that_shape_that_are_no_copies_stay_errors(peft_folder, rename, unexpected):
    base, _, folder = peft_folder
    tensors = load_file(folder / WEIGHTS)
    for old, new in rename.items():
        value = tensors.pop(old)
        if new is not None:
            tensors[new] = value
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    model = copy.deepcopy(base)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=re.escape(unexpected)):
        lorakit.load_adapter(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
