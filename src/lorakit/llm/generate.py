"""Answers from a causal language model: greedy or sampled, streamed, base vs adapters.

A `prompt` is plain text that the model continues (what `prompt` + `completion` training
data teaches); `messages` are a chat, rendered by the tokenizer's own chat template with the
assistant's turn opened (what an instruct model and `messages` training data expect).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_names, set_active
from ..errors import AdapterError, ConfigError
from ..inject import lora_layers
from ..merge import disabled
from .deps import require

BASE = "base"  # compare's name for the answer without adapters
Stream = Callable[[str], None]  # receives each new piece of text as it is decoded


def encode(
    tokenizer: Any, prompt: str | None = None, messages: Sequence[dict] | None = None
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, (1, tokens) each, for `prompt` or `messages`.

    Raises:
        ConfigError: neither or both given, an empty prompt, a malformed message, or messages
            for a tokenizer without a chat template.
    """
    if (prompt is None) == (messages is None):
        raise ConfigError("pass exactly one of prompt (plain text) and messages (a chat)")
    if prompt is not None:
        return _ids(tokenizer(prompt, return_tensors="pt"))
    check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template, so messages cannot be rendered; pass a plain "
            "text prompt instead"
        )
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # The template writes any special tokens itself (e.g. <|im_start|>).
    return _ids(tokenizer(text, add_special_tokens=False, return_tensors="pt"))


def _ids(encoded: Any) -> dict[str, torch.Tensor]:
    if encoded["input_ids"].shape[1] == 0:
        raise ConfigError("the prompt is empty: it encodes to no tokens")
    # Some tokenizers add token_type_ids, which decoder models do not take.
    return {key: encoded[key] for key in ("input_ids", "attention_mask")}


def check_messages(messages: object) -> None:
    """Raise ConfigError naming the first entry that is not {"role": str, "content": str}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(
            f"messages must be a non-empty list of {{role, content}}, got {messages!r:.80}"
        )
    for i, message in enumerate(messages):
        fields_ok = isinstance(message, dict) and all(
            isinstance(message.get(key), str) for key in ("role", "content")
        )
        if not fields_ok:
            raise ConfigError(
                f"messages[{i}] must be {{\"role\": str, \"content\": str}}, got {message!r}"
            )


def decoding_options(max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """`model.generate` options: greedy when temperature is 0, else nucleus sampling.

    Raises:
        ConfigError: max_new_tokens < 1, temperature < 0, or top_p outside (0, 1].
    """
    is_int = isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
    if not is_int or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0:
        return {"max_new_tokens": max_new_tokens, "do_sample": False,
                "temperature": None, "top_p": None, "top_k": None}  # fmt: skip
    # top_k=0 turns off transformers' default top-50 cut: top_p alone decides.
    return {"max_new_tokens": max_new_tokens, "do_sample": True,
            "temperature": temperature, "top_p": top_p, "top_k": 0}  # fmt: skip


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | None = None,
    messages: Sequence[dict] | None = None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: Stream | None = None,
) -> str:
    """The model's answer to `prompt` (plain text) or `messages` (a chat): the new text only.

    temperature 0 (default) decodes greedily; above 0 it samples from the top_p nucleus,
    reproducibly when `seed` is given (the global random state is left as it was). `stream`,
    when given, receives the text piece by piece as it is generated.

    Raises:
        ConfigError: see `encode` and `decoding_options`.
        MissingDependencyError: transformers is missing.
    """
    require(("transformers",), "generating text")
    options = decoding_options(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encode(tokenizer, prompt, messages).items()}
    if stream is not None:
        options["streamer"] = callback_streamer(tokenizer, stream)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), _seeded(seed, device):
        out = model.generate(**inputs, **options, pad_token_id=pad)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Within the block torch draws from `seed`; the random state comes back after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def callback_streamer(tokenizer: Any, callback: Stream) -> Any:
    """A transformers streamer that hands each finished piece of the new text to `callback`."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                callback(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@contextmanager
def using_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Within the block only adapter `name` is active (None: no adapter, the base model); the
    active adapters and every parameter's requires_grad come back after.

    Raises:
        AdapterError: `name` is unknown, or adapters are merged (see `set_active`).
    """
    if name is None:
        with disabled(model):
            yield model
        return
    active = [(layer, layer.lora_active) for _, layer in lora_layers(model)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    set_active(model, name)
    try:
        yield model
    finally:
        for layer, names in active:
            layer.lora_active = names
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def compare(
    model: nn.Module,
    tokenizer: Any,
    adapters: Sequence[str | None],
    prompt: str | None = None,
    messages: Sequence[dict] | None = None,
    **options: Any,
) -> dict[str, str]:
    """{name: answer} with each of `adapters` active alone; None stands for the base model,
    named "base". `options` are `generate`'s (a `stream` gets every answer in turn).

    Raises:
        ConfigError: a name is listed twice.
        AdapterError: a name is not on the model, or adapters are merged.
    """
    names = [BASE if a is None else a for a in adapters]
    if len(set(names)) != len(names):
        raise ConfigError(f"adapters lists a name twice: {names}")
    known = adapter_names(model)
    unknown = [a for a in adapters if a is not None and a not in known]
    if unknown:  # before the first answer, not after it
        raise AdapterError(f"unknown adapter(s) {unknown}; the model has {list(known)}")
    answers = {}
    for adapter, name in zip(adapters, names):
        with using_adapter(model, adapter):
            answers[name] = generate(model, tokenizer, prompt, messages, **options)
    return answers
