"""Dead letters as people look at them: what each one holds, and which ones a requeue takes.

A dead letter's body is whatever was sent, and may not be an envelope at all (that may be why
it died). `describe` reads the task name and id when the body is an envelope, a signed one
included (the signature line is skipped: nothing here runs the task, and a worker checks the
signature again when it runs), and says why not when it is not. Arguments are never shown: they
may hold secrets. A body that is not an envelope is shown only as a short escaped preview.

`Selection` is what `conveyor requeue` matches: a reason containing some text, task ids, or both.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.brokers.base import DeadLetter
from conveyor.errors import DecodeError
from conveyor.message import decode
from conveyor.redact import redact_text
from conveyor.signing import PREFIX as SIGNED_PREFIX

PREVIEW_CHARS = 40
# Bytes of a body read for its preview.
PREVIEW_SCAN = 4096


@dataclass(frozen=True, slots=True)
class Described:
    """A dead letter with what its body says: a task's name and id, or why it has none."""

    letter: DeadLetter
    task: str | None
    id: str | None
    problem: str | None
    """Why the body is not an envelope (a dead-letter reason), or None when it is one."""


def describe(letter: DeadLetter) -> Described:
    """Read the task name and id of a dead letter, if its body is an envelope."""
    body = bytes(letter.body)
    if body.startswith(SIGNED_PREFIX):
        body = body.partition(b"\n")[2]
    try:
        envelope = decode(body, max_size=max(len(body), 1))
    except DecodeError as exc:
        return Described(letter, None, None, exc.reason)
    return Described(letter, envelope.task, envelope.id, None)


def preview(body: bytes, chars: int = PREVIEW_CHARS) -> str:
    """The start of a body as escaped text, passwords in URLs masked: safe to print."""
    # Masked before it is cut, so a URL cut short cannot show part of its password.
    text = redact_text(repr(bytes(body[:PREVIEW_SCAN]))[2:-1])
    return text if len(text) <= chars and len(body) <= PREVIEW_SCAN else text[:chars] + "..."


@dataclass(frozen=True, slots=True)
class Selection:
    """Dead letters whose reason contains `reason` (any case), and whose task id is one of
    `ids`; an empty part matches everything."""

    reason: str | None = None
    ids: frozenset[str] = frozenset()

    @property
    def everything(self) -> bool:
        """True when nothing is filtered out."""
        return not self.reason and not self.ids

    def __call__(self, letter: DeadLetter) -> bool:
        """True when `letter` is selected."""
        if self.reason and self.reason.casefold() not in letter.reason.casefold():
            return False
        return not self.ids or describe(letter).id in self.ids
