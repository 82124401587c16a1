"""The OpenAI response bodies: whole answers, stream chunks, usage, model lists, errors."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .sequence import Finish


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(finish: Finish) -> dict[str, int]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}  # fmt: skip


class Shape:
    """Builds one request's bodies, completion or chat, all with the same id and time."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: Finish) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish.reason}  # fmt: skip
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage(finish)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:  # fmt: skip
        """One stream event: a piece of text, the opening role (chat), or the finish."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, finish: Finish) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage(finish)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(model_id: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "lorakit",
            "root": root, "parent": parent}  # fmt: skip
