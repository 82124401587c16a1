"""The serving engine: one base model with named adapters, a bounded queue, a decoding thread.

    engine = Engine(model, tokenizer, "smollm2", max_batch=8, max_queue=64)
    engine.add_adapter("support", "runs/support/adapter")
    engine.start()
    seq = engine.submit(Job(engine.encode(prompt="Hi"), adapter="support"), sink=print)

Requests wait in the queue (full: `QueueFull`) until a batch slot is free; the decoding
thread admits them between steps and runs one forward per step for every running request,
each with its own adapter (`Batcher`). A request's events reach its `sink` from that thread.
Adapters load and unload between steps; an unload waits for the requests using it.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Sequence as Seq
from os import PathLike
from typing import Any

import torch
from torch import nn

from ..adapters import delete_adapter
from ..checkpoint import load_adapter
from ..errors import LorakitError
from ..llm.generate import encode
from .adapters import AdapterTable
from .batcher import Batcher
from .errors import BadRequest, EngineClosed, QueueFull
from .sequence import Failed, Job, Sequence, Sink


class Engine:
    """Owns the model, the adapters on it, the waiting queue and the decoding thread."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, base_id: str, *, max_batch: int = 8,
        max_queue: int = 64,
    ) -> None:  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise BadRequest(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{max_queue}")  # fmt: skip
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = int(model.config.max_position_embeddings)
        self.eos_ids = eos_token_ids(model)
        self.adapters = AdapterTable(base_id)
        self.finished: Counter[str] = Counter()  # finish reason -> requests
        self._cond = threading.Condition()  # guards the queue, adapters table and counters
        self._waiting: deque[Sequence] = deque()
        self._model_lock = threading.Lock()  # one step or one adapter change at a time
        self._tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use
        self._batcher = Batcher(self.model, self._ended)
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: Seq[dict] | None = None) -> tuple:
        """Token ids of a plain prompt, or of a chat rendered by the tokenizer's template.

        Raises:
            ConfigError: empty prompt, malformed messages, or no chat template.
        """
        with self._tokenizer_lock:
            return tuple(encode(self.tokenizer, prompt, messages)["input_ids"][0].tolist())

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, job: Job, sink: Sink) -> Sequence:
        """Queue `job`; its events go to `sink`. Returns the sequence (`cancel()` drops it).

        Raises:
            BadRequest: max_tokens < 1, or prompt plus max_tokens beyond the model's context.
            ModelNotFound: the adapter is not loaded (or is being unloaded).
            QueueFull: max_batch requests run and max_queue more wait already.
            EngineClosed: the engine is shutting down.
        """
        self._check_length(job)
        seq = Sequence(job, sink, self.decode, self.eos_ids)
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if job.adapter is not None:
                self.adapters.resolve(job.adapter)
            if sum(self.adapters.in_use.values()) >= self.max_batch + self.max_queue:
                raise QueueFull(f"the server is full ({self.max_batch} requests running, "
                                f"{self.max_queue} waiting); retry later")  # fmt: skip
            self.adapters.in_use[job.adapter or ""] += 1
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def _check_length(self, job: Job) -> None:
        if isinstance(job.max_tokens, bool) or not isinstance(job.max_tokens, int):
            raise BadRequest(f"max_tokens must be an integer, got {job.max_tokens!r}")
        if job.max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {job.max_tokens}")
        total = len(job.prompt_ids) + job.max_tokens
        if total > self.context:
            raise BadRequest(
                f"the prompt ({len(job.prompt_ids)} tokens) plus max_tokens ({job.max_tokens}) "
                f"is {total} tokens, beyond the model's context of {self.context} tokens"
            )

    def status(self) -> dict[str, Any]:
        """Running and waiting requests, and how many finished for each reason."""
        with self._cond:
            return {"running": len(self._batcher.rows), "waiting": len(self._waiting),
                    "finished": dict(self.finished)}  # fmt: skip

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | PathLike) -> None:
        """Load the adapter folder `path` as `name` (between decoding steps).

        Raises:
            BadRequest: the name is taken, or the loader refused the folder (its message).
        """
        with self._cond:
            self.adapters.check_new_name(name)
            self.adapters.loading.add(name)
        try:
            with self._model_lock:
                self._batcher.release()
                load_adapter(self.model, path, name)
        except (LorakitError, OSError) as err:
            raise BadRequest(f"cannot load adapter {name!r} from {str(path)!r}: {err}") from None
        finally:
            with self._cond:
                self.adapters.loading.discard(name)
        with self._cond:
            self.adapters.paths[name] = str(path)

    def remove_adapter(self, name: str, timeout: float = 60.0) -> None:
        """Unload adapter `name` once no request uses it; new requests for it are refused
        meanwhile. Raises ModelNotFound (unknown), BadRequest (still used after `timeout` s)."""
        with self._cond:
            self.adapters.resolve(name)
            if name == self.adapters.base_id:
                raise BadRequest(f"{name!r} is the base model; only adapters can be unloaded")
            self.adapters.draining.add(name)
            idle = self._cond.wait_for(lambda: self.adapters.in_use[name] == 0, timeout)
            if not idle:
                self.adapters.draining.discard(name)
                raise BadRequest(f"adapter {name!r} is still used by {self.adapters.in_use[name]} "
                                 f"requests after {timeout:g} s; it stays loaded")  # fmt: skip
        with self._model_lock:
            self._batcher.release()
            delete_adapter(self.model, name)
        with self._cond:
            self.adapters.draining.discard(name)
            del self.adapters.paths[name]

    # -- the decoding thread ----------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; requests still queued or running get a Failed event."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._drain()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._batcher.rows or self._closing)
                if self._closing:
                    break
                free = self.max_batch - len(self._batcher.rows)
                joiners = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._run_step(joiners)
        self._drain()

    def _drain(self) -> None:
        with self._cond:
            left = [*self._waiting, *self._batcher.reset()]
            self._waiting.clear()
        self._fail(left, "the server is shutting down")

    def _run_step(self, joiners: list[Sequence]) -> None:
        """Admit `joiners`, then one step for all; a failure fails the requests involved (with
        the error's message) instead of stopping the thread."""
        pending = list(joiners)
        try:
            with self._model_lock, torch.no_grad():
                while pending:
                    self._batcher.join(pending[0])
                    pending.pop(0)
                self._batcher.step()
        except Exception as err:  # noqa: BLE001 - the thread must outlive any one request
            self._fail([*pending, *self._batcher.reset()], f"generation failed: {err}")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            seq.sink(Failed(message))
            self._release(seq, "failed")

    def _ended(self, seq: Sequence, reason: str) -> None:
        seq.finish(reason)
        self._release(seq, reason)

    def _release(self, seq: Sequence, reason: str) -> None:
        with self._cond:
            self.adapters.in_use[seq.job.adapter or ""] -= 1
            self.finished[reason] += 1
            self._cond.notify_all()


def eos_token_ids(model: nn.Module) -> frozenset[int]:
    """The tokens that end an answer: the generation config's eos ids (as `generate` uses)."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
