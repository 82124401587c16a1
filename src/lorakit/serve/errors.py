"""The server's errors: each carries the HTTP status and OpenAI error type it answers with.

They subclass `LorakitError`, so the engine used without the HTTP app raises lorakit errors;
the app turns any of them into `{"error": {"message", "type", "code"}}` with `status`.
"""

from __future__ import annotations

from ..errors import LorakitError


class ServeError(LorakitError):
    """A request the server refuses; the message says why."""

    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class BadRequest(ServeError, ValueError):
    """The request asks for something the server cannot do (too long, bad adapter folder)."""


class ModelNotFound(ServeError, LookupError):
    """The request's `model` names neither the base model nor a loaded adapter."""

    status = 404
    code = "model_not_found"


class QueueFull(ServeError):
    """Every slot of the waiting queue is taken; the client should retry later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class EngineClosed(ServeError):
    """The engine is shutting down and takes no more requests."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class InvalidField(ServeError, TypeError):
    """A field of the request body has the wrong type (or a required one is missing)."""

    status = 422
    code = "invalid_type"


class Unauthorized(ServeError):
    """The request lacks the server's API key."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotEnabled(ServeError):
    """An endpoint that this server was started without (runtime adapter loading)."""

    status = 404
    code = "not_enabled"
