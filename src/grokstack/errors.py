"""One exception hierarchy for everything a user can get wrong.

Each class carries the CLI exit code and the HTTP status it maps to, so the CLI and the
server translate errors in one place each and never show a traceback for bad input.
"""

from __future__ import annotations


class GrokstackError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""

    exit_code = 1
    http_status = 400


class ConfigError(GrokstackError):
    """A config file or value is missing, malformed or unsupported."""


class CheckpointError(GrokstackError):
    """A checkpoint folder or file is missing, truncated or inconsistent."""


class TokenizerError(GrokstackError):
    """A tokenizer file is missing or malformed."""


class ContextLengthError(GrokstackError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class InvalidArgumentError(GrokstackError):
    """A value passed on the command line or to the API is out of range."""

    exit_code = 2


class ContentFilterError(GrokstackError):
    """A request the guard blocked, when the server answers blocks with an error (--guard-block-style error)."""

    def __init__(self, message: str, codes: list[str]) -> None:
        super().__init__(message)
        self.codes = codes


class NotFoundError(GrokstackError):
    """An unknown model, route or deferred request id."""

    http_status = 404


class AuthenticationError(GrokstackError):
    """A missing or wrong API key."""

    http_status = 401


class PermissionDeniedError(GrokstackError):
    """A valid API key that may not do this (an admin-only route called with an ordinary key)."""

    http_status = 403


class RateLimitError(GrokstackError):
    """An API key used more requests or tokens per minute than it may."""

    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(GrokstackError):
    """The server's queue is full or it is shutting down: try again later."""

    http_status = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
