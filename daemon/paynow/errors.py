"""What can go wrong talking to PayNow, and whether trying again can help.

Every error's `str()` is one line of printable text without a secret: what
PayNow sent is escaped, and a token or API key it echoed is replaced by a
placeholder. Errors are raised without a chained cause, so no traceback can
carry request headers.
"""

from __future__ import annotations

from typing import ClassVar, Final

_MAX_DETAIL: Final = 200  # characters kept of a message PayNow sent


class PayNowError(Exception):
    """Base of every PayNow error. `kind` is a short machine string for metrics
    and status output; `retryable` says whether the same request, made again,
    could succeed (only the retry policy acts on it)."""

    kind: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        trace_id: str | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # HTTP status, when there was a response
        self.code = code  # PayNow's error `code`, when the body had one
        self.trace_id = trace_id  # PayNow's `trace_id`, when the body had one
        self.attempts = attempts  # HTTP attempts made for the failing request
        self.retry_after = retry_after  # seconds PayNow asked us to wait (429, 503)

    def __str__(self) -> str:
        return self.message

    def after_attempts(self, reason: str, attempts: int) -> PayNowError:
        """The same error, once the retries are over: `reason` says why they stopped."""
        return type(self)(
            f"{self.message}; {reason}",
            status=self.status,
            code=self.code,
            trace_id=self.trace_id,
            attempts=attempts,
            retry_after=self.retry_after,
        )


class PayNowAuthError(PayNowError):
    """401/403, or a credential that cannot be sent at all."""

    kind = "auth"


class PayNowNotFound(PayNowError):
    """404."""

    kind = "not_found"


class PayNowHTTPError(PayNowError):
    """Any other final 4xx status (400, 405, 409, 422, ...)."""

    kind = "http_error"


class PayNowUnavailable(PayNowError):
    """Connection errors, 408 and 5xx."""

    kind = "unavailable"
    retryable = True


class PayNowTimeout(PayNowUnavailable):
    """The attempt timed out."""

    kind = "timeout"


class PayNowRateLimited(PayNowUnavailable):
    """429 (`retry_after` holds its `Retry-After`, if any)."""

    kind = "rate_limited"


class PayNowBadResponse(PayNowError):
    """An answer that is not what the spec says: malformed or truncated JSON,
    wrong shape, a failed validation, bad pagination, a body over the size
    cap, or an unexpected redirect."""

    kind = "bad_response"


# ------------------------------------------------------------------------- text


def scrub(message: str, secret: str, placeholder: str) -> str:
    """One line of printable text, `secret` (should anything echo it) replaced."""
    message = printable(" ".join(message.split()))
    if secret and secret in message:
        message = message.replace(secret, placeholder)
    return message


def scrub_error(error: PayNowError, secret: str, placeholder: str) -> None:
    """Make `error`'s message safe in place (see `scrub`)."""
    message = scrub(error.message, secret, placeholder)
    if message != error.message:
        error.message = message
        error.args = (message,)


def one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    """`text` on one line, at most `limit` characters, printable."""
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return printable(text)


def printable(text: str) -> str:
    """`text` with what PayNow may send but a log line, SQLite or a terminal
    cannot take (control characters, lone surrogates, invisible bidi
    overrides) written as \\uXXXX escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def exc_text(exc: BaseException) -> str:
    """An exception as one short line: its class, and its message if any."""
    text = one_line(str(exc), 160)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
