"""The OpenAI request bodies the server reads, and how each becomes an engine `Job`.

Types are checked strictly (a string where a number belongs is a 422, never coerced); values
the server cannot honour (n > 1, echo, logprobs, too many stop strings) are a 400 naming the
field. `model` names an adapter, or the base model's id for none.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .engine import Engine
from .errors import BadRequest, InvalidField
from .sampling import Sampling
from .sequence import Job

MAX_STOPS = 4  # OpenAI's limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens whatever comes
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadRequest(f"n must be 1 (one answer per request), got {self.n}")
        if self.logprobs not in (None, False, 0):
            raise BadRequest("logprobs are not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise BadRequest(f"{name} is not supported by this server; leave it at 0")

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOPS:
            raise BadRequest(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
        return stops

    def job(self, engine: Engine, prompt_ids: tuple[int, ...], max_tokens: int) -> Job:
        self.check_supported()
        sampling = Sampling(self.temperature, self.top_p, self.seed)
        adapter = engine.adapters.resolve(self.model)
        return Job(prompt_ids, adapter, max_tokens, sampling, self.stops(), self.ignore_eos)


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: bool = False

    def to_job(self, engine: Engine) -> Job:
        if self.echo:
            raise BadRequest("echo is not supported by this server")
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest(f"prompt must be one string (or a list of one), got "
                                 f"{len(prompt)} prompts")  # fmt: skip
            prompt = prompt[0]
        max_tokens = COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return self.job(engine, engine.encode(prompt=prompt), max_tokens)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[ContentPart]

    def plain(self) -> dict[str, str]:
        """{"role", "content"} with the text parts of a list content joined."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise BadRequest(f"message content parts must be text, got {sorted(kinds)}")
        return {"role": self.role, "content": "".join(part.text for part in self.content)}


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def to_job(self, engine: Engine) -> Job:
        if not self.messages:
            raise BadRequest("messages must hold at least one message")
        ids = engine.encode(messages=[m.plain() for m in self.messages])
        limit = self.max_completion_tokens if self.max_tokens is None else self.max_tokens
        # Without a limit the answer may fill the context (at least one token is asked for).
        return self.job(engine, ids, max(engine.context - len(ids), 1) if limit is None else limit)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str


def parse(raw: bytes, model: type[BaseModel]) -> Any:
    """The request body as `model`.

    Raises:
        BadRequest: the body is not JSON.
        InvalidField: not a JSON object, or a field is missing or of the wrong type.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidField(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise InvalidField(describe(err)) from None


def describe(err: ValidationError) -> str:
    """One clause per wrong field: which, what was expected, what came (a field of several
    allowed types, like `stop`, is named once)."""
    by_field: dict[str, list[dict]] = {}
    for e in err.errors():
        by_field.setdefault(_field(e["loc"]), []).append(e)
    clauses = []
    for where, errors in by_field.items():
        first = errors[0]
        if first["type"] == "missing":
            clauses.append(f"{where}: field required")
            continue
        what = first["msg"] if len(errors) == 1 else "has the wrong type"
        clauses.append(f"{where}: {what} (got {json.dumps(first.get('input'))[:60]})")
    return "; ".join(clauses)


def _field(loc: tuple) -> str:
    """`messages.0.content` from pydantic's location, without the names of union members."""
    parts = [str(p) for p in loc if isinstance(p, int) or not _union_member(str(p))]
    return ".".join(parts) or "body"


def _union_member(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or any(c in part for c in "[]|")
