"""Shared by the serve tests: a tiny chat model with a longer context, adapters saved with
lorakit (different ranks and targets, random factors so answers differ), and a sink that
collects a request's events."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from conftest import randomise_lora
from llm_fixtures import tiny_chat_model

import lorakit
from lorakit.llm import load_causal_lm
from lorakit.serve import Failed, Finish, Piece

CONTEXT = 512
# name -> (LoraConfig options, seed of the random factors)
ADAPTERS = {
    "alpha": (dict(rank=2, targets=("q_proj", "v_proj")), 1),
    "beta": (dict(rank=4, targets="all-linear"), 2),
    "gamma": (dict(rank=8, targets=("embed_tokens", "o_proj", "down_proj")), 3),
}


def serve_model(folder: Path, context: int = CONTEXT) -> Path:
    """The tests' tiny chat Llama, with a `context`-token window (the fixture's is 64)."""
    tiny_chat_model(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = context
    config_path.write_text(json.dumps(config))
    return folder


def save_adapters(model_folder: Path, out: Path, names: tuple[str, ...] = tuple(ADAPTERS)):
    """{name: folder} of adapters of `model_folder` saved under `out`."""
    folders = {}
    for name in names:
        options, seed = ADAPTERS[name]
        model, _ = load_causal_lm(model_folder)
        lorakit.inject(model, lorakit.LoraConfig(**options))
        randomise_lora(model, std=0.5, seed=seed)
        folders[name] = lorakit.save_adapter(model, out / name)
    return folders


class Collect:
    """A request's sink: its text pieces and how it ended; `wait()` blocks until it did."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.end: Finish | Failed | None = None
        self._done = threading.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, Piece):
            self.pieces.append(event.text)
        else:
            self.end = event
            self._done.set()

    def wait(self, timeout: float = 60) -> Finish | Failed:
        assert self._done.wait(timeout), "the request never finished"
        return self.end

    @property
    def text(self) -> str:
        return "".join(self.pieces)
