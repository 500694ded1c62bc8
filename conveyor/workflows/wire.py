"""The `workflow` field of an envelope: what happens once this task has finished.

A workflow is built whole by its sender, every node's task id assigned before anything is sent,
then travels in pieces: each message carries only its own continuation (`then`: the nodes to
start with its result), its error callbacks, and, for a chord member, a reference to its chord
(id, index, size). A chord's callback is not copied into its members: it is written to the result
store once, when the chord is sent (see `conveyor.workflows.joins`).

The field is optional and versioned (`"v": 1`); an envelope without it decodes as before, and one
whose field does not validate is dead-lettered with the reason, like any invalid envelope.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

WORKFLOW_VERSION = 1

_Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
_Priority = Annotated[int, msgspec.Meta(ge=0, le=9)]
_Seconds = Annotated[float, msgspec.Meta(ge=0, le=100 * 365 * 86_400.0)]
_Size = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
_Index = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
_Nonce = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class _Frozen(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    pass


class ChordRef(_Frozen, frozen=True):
    """Where a chord member's result goes: slot `index` of `size` in chord `id`."""

    id: _Identifier
    index: _Index
    size: _Size

    def __post_init__(self) -> None:
        if self.index >= self.size:
            raise ValueError(f"chord member index {self.index} is not below its size {self.size}")


class Call(_Frozen, frozen=True, tag="call", tag_field="kind"):
    """One task to send: its id, arguments and routing, all fixed by the sender."""

    id: _Identifier
    task: _Name
    queue: _Name
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    immutable: bool = False
    """True (`.si()`): the previous result is not prepended to `args`."""
    priority: _Priority = 0
    countdown: _Seconds | None = None
    expires: _Seconds | None = None
    """Seconds after its send that it is dropped if it has not started."""
    then: tuple[Node, ...] = ()
    errbacks: tuple[Call, ...] = ()
    chord: ChordRef | None = None


class Group(_Frozen, frozen=True, tag="group", tag_field="kind"):
    """Members started together with the same input."""

    id: _Identifier
    members: tuple[Node, ...]


class Chord(_Frozen, frozen=True, tag="chord", tag_field="kind"):
    """A group whose results, in order, go to `body` once every member has finished."""

    id: _Identifier
    header: tuple[Node, ...]
    body: Node
    pass_errors: bool = False


Node = Call | Group | Chord


class Workflow(_Frozen, frozen=True, tag=WORKFLOW_VERSION, tag_field="v"):
    """The continuation a message carries (version 1)."""

    then: tuple[Node, ...] = ()
    errbacks: tuple[Call, ...] = ()
    chord: ChordRef | None = None
    nonce: _Nonce | None = None
    """Set on messages a worker sent as a continuation: a copy of the message published again
    (a redelivered predecessor) has another nonce and is not run twice."""


class ChordSpec(_Frozen, frozen=True):
    """What the result store keeps of a chord while its members run."""

    body: Node
    size: _Size
    pass_errors: bool = False
    root_id: _Identifier | None = None


spec_encoder = msgspec.json.Encoder()
spec_decoder = msgspec.json.Decoder(ChordSpec)
