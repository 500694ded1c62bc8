"""Why a message was dead-lettered: a fixed category first, then the detail.

Every dead-letter reason conveyor writes is `<category>: <detail>`. The category is one of
`DeadLetterReason`'s values, chosen by conveyor from the kind of failure (an exception type, a
check of its own), never read from a library's message text, so it stays the same across
releases of msgspec, aiormq or Python and users can count and alert on it. The detail after the
first `": "` says what exactly was wrong; it may quote a library and may change between releases.
docs/guarantees.md lists every category with an example.
"""

from __future__ import annotations

from enum import StrEnum


class DeadLetterReason(StrEnum):
    """The category that starts every dead-letter reason."""

    TOO_LARGE = "message too large"
    """The body is over `max_message_size` (checked before anything is parsed)."""
    UNSIGNED = "unsigned message"
    """The worker has a signing key and the body carries no signature."""
    BAD_SIGNATURE = "bad signature"
    """The signature line is malformed, or no accepted key made it."""
    UNEXPECTED_SIGNATURE = "unexpected signature"
    """The body is signed and the worker has no signing key to check it with."""
    UNDECODABLE = "undecodable message"
    """The bytes cannot be read at all: not UTF-8, or nested deeper than can be parsed."""
    MALFORMED_JSON = "malformed JSON"
    """UTF-8 text that is not one JSON document (NaN, a trailing comma, a truncated body...)."""
    DUPLICATE_KEY = "duplicate key"
    """Some JSON object holds the same key twice (the two values could be read either way)."""
    NOT_AN_ENVELOPE = "not an envelope"
    """JSON, but not an object with a version field `v`."""
    UNKNOWN_VERSION = "unknown envelope version"
    """An envelope of a version this worker does not read."""
    INVALID_ENVELOPE = "invalid envelope"
    """A field is missing, unknown, of the wrong type or out of its range."""
    INVALID_HEADERS = "invalid headers"
    """A broker header name or value is not valid UTF-8 (RabbitMQ)."""
    WRONG_CONTENT_TYPE = "wrong content type"
    """The message's content type is not one conveyor writes (RabbitMQ)."""
    UNKNOWN_TASK = "unknown task"
    """No task of that name is registered on the worker's app."""
    BAD_ARGUMENTS = "bad arguments"
    """The arguments do not fit the task's signature."""
    POISON = "poison message"
    """Its runs kept dying (`poison_limit`), or it kept coming back unfinished (ten times that)."""
    RETRIES_EXHAUSTED = "retries exhausted"
    """The task failed on its last allowed try (late acks only; the failure is also stored)."""
    SETTLEMENT_FAILED = "settlement failed"
    """The outcome of a run could not be recorded or acted on."""

    def __call__(self, detail: str) -> str:
        """The full reason: this category, then `detail`."""
        return f"{self.value}: {detail}"

    @classmethod
    def of(cls, reason: str) -> DeadLetterReason | None:
        """The category a stored reason starts with, or None for a reason conveyor did not write."""
        category, _, _ = reason.partition(": ")
        try:
            return cls(category)
        except ValueError:
            return None
