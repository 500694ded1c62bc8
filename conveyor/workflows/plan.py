"""From workflow nodes to envelopes, and from a finished task to what follows it.

Both the sender of a workflow and the worker that settles one of its tasks start nodes the same
way (`start`): a call becomes an envelope (the previous result prepended to its arguments unless
it is immutable), a group starts each member, a chord keeps its spec in the result store and
starts each member of its header. Nothing here does I/O except `Continuations`, which the
worker's round calls after the finished tasks' records are stored and before their messages are
acknowledged (see `conveyor.worker.rounds`):

1. `plan`: for each finished workflow task, the messages that follow it (with the ids the sender
   assigned, so a redelivered task publishes the same ids again), its chord's join, and the
   records of what can no longer run after a failure;
2. the round publishes those messages;
3. `fired`: chords whose callback was published are marked fired.

A crash anywhere before the acknowledgement redelivers the finished task and its settlement runs
again: its join adds nothing new, and finding its chord complete but not marked fired it
publishes the callback again, with the same id. Such a second copy carries another nonce, and
the worker that receives it after the first copy claimed the run acknowledges it without
running it (`Continuations.claim`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from conveyor.brokers import Outgoing
from conveyor.errors import ConfigurationError, ConveyorError
from conveyor.message import Envelope
from conveyor.results import ResultRecord, State
from conveyor.workflows.joins import Joins, joins_for
from conveyor.workflows.wire import (
    Call,
    ChordRef,
    ChordSpec,
    Group,
    Node,
    Workflow,
    spec_decoder,
    spec_encoder,
)

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = logging.getLogger("conveyor.workflows")

#: "No previous result": the first nodes of a workflow start with their own arguments only.
NO_VALUE: Any = object()


class Slot(msgspec.Struct, frozen=True, omit_defaults=True):
    """A chord member's outcome, as its join keeps it."""

    id: str
    task: str
    ok: bool
    value: msgspec.Raw = msgspec.Raw(b"null")
    error_type: str | None = None
    error_message: str | None = None


_slot_decoder = msgspec.json.Decoder(Slot)


@dataclass
class Sends:
    """What starting some nodes takes: chord specs to keep, then envelopes to send."""

    envelopes: list[Envelope] = field(default_factory=list)
    chords: list[tuple[str, bytes]] = field(default_factory=list)


def start(
    node: Node,
    value: Any,
    sends: Sends,
    *,
    root_id: str | None,
    parent_id: str | None,
    nonce: bool,
    now: float,
) -> None:
    """Add to `sends` what starting `node` with the previous result `value` takes."""
    if isinstance(node, Call):
        sends.envelopes.append(_envelope(node, value, root_id, parent_id, nonce, now))
    elif isinstance(node, Group):
        for member in node.members:
            start(member, value, sends, root_id=root_id, parent_id=parent_id, nonce=nonce, now=now)
    elif not node.header:
        start(node.body, [], sends, root_id=root_id, parent_id=parent_id, nonce=nonce, now=now)
    else:
        spec = ChordSpec(
            body=node.body, size=len(node.header), pass_errors=node.pass_errors, root_id=root_id
        )
        sends.chords.append((node.id, spec_encoder.encode(spec)))
        for member in node.header:
            start(member, value, sends, root_id=root_id, parent_id=parent_id, nonce=nonce, now=now)


def _envelope(
    call: Call, value: Any, root_id: str | None, parent_id: str | None, nonce: bool, now: float
) -> Envelope:
    args = call.args if value is NO_VALUE or call.immutable else (value, *call.args)
    workflow: Workflow | msgspec.UnsetType = msgspec.UNSET
    if call.then or call.errbacks or call.chord is not None or nonce:
        workflow = Workflow(
            then=call.then,
            errbacks=call.errbacks,
            chord=call.chord,
            nonce=f"{random.getrandbits(64):016x}" if nonce else None,
        )
    return Envelope(
        id=call.id,
        task=call.task,
        queue=call.queue,
        args=tuple(args),
        kwargs=call.kwargs,
        priority=call.priority,
        eta=None if not call.countdown else now + call.countdown,
        expires=None if call.expires is None else now + call.expires,
        root_id=root_id,
        parent_id=parent_id,
        sent_at=now,
        workflow=workflow,
    )


def calls(nodes: Sequence[Node]) -> Iterator[Call]:
    """Every call in `nodes` and in what follows them, error callbacks included."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, Call):
            yield node
            stack.extend(node.then)
            stack.extend(node.errbacks)
        elif isinstance(node, Group):
            stack.extend(node.members)
        else:
            stack.extend(node.header)
            stack.append(node.body)


def downstream(nodes: Sequence[Node]) -> Iterator[Call]:
    """The calls that would run after `nodes` succeeded: not their error callbacks."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, Call):
            yield node
            stack.extend(node.then)
        elif isinstance(node, Group):
            stack.extend(node.members)
        else:
            stack.extend(node.header)
            stack.append(node.body)


@dataclass(frozen=True, slots=True)
class Follow:
    """A workflow task's final outcome, for `Continuations.plan` (settlement decides it, the
    round carries it out)."""

    envelope: Envelope
    ok: bool
    value: msgspec.Raw | None
    error_type: str | None
    error_message: str | None
    expires_at: float


def failed(envelope: Envelope, error_type: str, message: str, expires_at: float) -> Follow | None:
    """The follow-up of a workflow task that ends without running (dead-lettered, expired,
    skipped): what follows it fails too, its chord with it, rather than wait for ever. None for
    a task outside any workflow."""
    if envelope.workflow is msgspec.UNSET:
        return None
    return Follow(envelope, False, None, error_type, message, expires_at)


@dataclass
class Plan:
    """What the round does for its finished workflow tasks: publish, then mark chords fired."""

    publish: list[Outgoing] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)


class Continuations:
    """The I/O side of workflows in the process that settles tasks."""

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        self._unusable: str | None = None

    def _joins(self) -> Joins | None:
        """The store's joins; None (said once in the log) if this worker has no store that
        keeps them: its senders had one, or they could not have sent a chord."""
        if self._unusable is not None:
            return None
        try:
            return joins_for(self.app.results)
        except ConfigurationError as exc:
            self._unusable = str(exc)
            log.error("this worker cannot keep workflows: %s", exc)
            return None

    def claim(self, envelopes: Sequence[Envelope], expires_at: float) -> list[bool]:
        """For each envelope, True if this copy of it may run (see the module docstring): a
        message that carries no nonce was sent by the workflow's sender and always may."""
        runs = [
            (i, e.id, e.workflow.nonce)
            for i, e in enumerate(envelopes)
            if not isinstance(e.workflow, msgspec.UnsetType) and e.workflow.nonce is not None
        ]
        allowed = [True] * len(envelopes)
        joins = self._joins() if runs else None
        if joins is None:
            return allowed  # nowhere to claim: at least once, as any task
        held = joins.claim_runs([(task_id, nonce) for _, task_id, nonce in runs], expires_at)
        for (i, _, _), ours in zip(runs, held, strict=True):
            allowed[i] = ours
        return allowed

    def plan(self, follows: Sequence[Follow]) -> Plan:
        """Join chords, keep chord specs and records, and encode what follows `follows`."""
        plan, sends, records = Plan(), Sends(), list[ResultRecord]()
        now = time.time()
        expires_at = max(f.expires_at for f in follows)
        for follow in follows:
            workflow = follow.envelope.workflow
            assert not isinstance(workflow, msgspec.UnsetType)
            env = follow.envelope
            root, parent = env.root_id or env.id, env.id
            if follow.ok:
                value = msgspec.json.decode(follow.value or b"null")
                for node in workflow.then:
                    start(node, value, sends, root_id=root, parent_id=parent, nonce=True, now=now)
            else:
                self._failed(follow, workflow, sends, records, now)
        members = [f for f in follows if _chord(f) is not None]
        if members:
            self._join(members, sends, records, plan, now)
        joins = self._joins() if sends.chords else None
        if joins is not None:
            joins.start(sends.chords, expires_at)
        plan.publish = self._encode(sends.envelopes, records, expires_at)
        store = self.app.results
        if records and store is not None:
            store.put(records)
        return plan

    def fired(self, chords: Sequence[str]) -> None:
        """Mark chords fired, once their callbacks (or failures) are safe."""
        joins = self._joins()
        if joins is not None:
            joins.fired(chords)

    def _failed(
        self,
        follow: Follow,
        workflow: Workflow,
        sends: Sends,
        records: list[ResultRecord],
        now: float,
    ) -> None:
        env = follow.envelope
        root = env.root_id or env.id
        for errback in workflow.errbacks:
            _start_errback(errback, env.id, sends, root, now)
        why = f"{follow.error_type}: {follow.error_message}"
        for call in downstream(workflow.then):
            records.append(
                _failure(call, follow, f"not run: task {env.task}[{env.id}] failed: {why}", now)
            )

    def _join(
        self,
        follows: Sequence[Follow],
        sends: Sends,
        records: list[ResultRecord],
        plan: Plan,
        now: float,
    ) -> None:
        """Join chord members, in one round trip to the store, then fire or fail each chord
        that a member completed (or failed) and that has not fired yet."""
        joins = self._joins()
        slots, members = [], []
        for follow in follows:
            env, ref = follow.envelope, _chord(follow)
            assert ref is not None
            slot = Slot(
                env.id,
                env.task,
                follow.ok,
                follow.value or msgspec.Raw(b"null"),
                follow.error_type,
                follow.error_message,
            )
            slots.append(slot)
            members.append((ref.id, ref.index, msgspec.json.encode(slot), follow.expires_at))
        if joins is None:
            for chord, index, _, _ in members:
                log.error("chord %s: member %d cannot be joined: %s", chord, index, self._unusable)
            return
        done = set(plan.fired)
        for follow, slot, joined in zip(follows, slots, joins.join(members), strict=True):
            ref = _chord(follow)
            assert ref is not None
            if joined.spec is None:
                log.error(
                    "chord %s: member %d (%s[%s]) finished but the chord is not in the result "
                    "store (expired, or sent to another store): its callback cannot run",
                    ref.id,
                    ref.index,
                    slot.task,
                    slot.id,
                )
                continue
            if joined.fired or ref.id in done:
                continue
            spec = spec_decoder.decode(joined.spec)
            if not follow.ok and not spec.pass_errors:
                self._fail_chord(ref.id, spec, ref.index, slot, sends, records, follow, now)
            elif joined.count < spec.size:
                continue
            else:
                self._complete(ref.id, spec, joins, sends, records, follow, now)
            done.add(ref.id)
            plan.fired.append(ref.id)

    def _complete(
        self,
        chord: str,
        spec: ChordSpec,
        joins: Joins,
        sends: Sends,
        records: list[ResultRecord],
        follow: Follow,
        now: float,
    ) -> None:
        """Every member is in: the callback with their results, or the chord's failure."""
        slots = [_slot_decoder.decode(data) for data in joins.members(chord)]
        failed = [(i, s) for i, s in enumerate(slots) if not s.ok]
        if failed and not spec.pass_errors:
            index, first = failed[0]
            self._fail_chord(chord, spec, index, first, sends, records, follow, now)
            return
        values = [_slot_value(s) for s in slots]
        start(spec.body, values, sends, root_id=spec.root_id, parent_id=chord, nonce=True, now=now)

    def _fail_chord(
        self,
        chord: str,
        spec: ChordSpec,
        index: int,
        slot: Slot,
        sends: Sends,
        records: list[ResultRecord],
        follow: Follow,
        now: float,
    ) -> None:
        why = (
            f"chord member {index} ({slot.task}[{slot.id}]) failed: "
            f"{slot.error_type}: {slot.error_message}"
        )
        failure = Follow(follow.envelope, False, None, "ChordFailed", why, follow.expires_at)
        for call in downstream((spec.body,)):
            records.append(_failure(call, failure, why, now))
        body = spec.body
        if isinstance(body, Call):
            for errback in body.errbacks:
                _start_errback(errback, slot.id, sends, spec.root_id or chord, now)

    def _encode(
        self, envelopes: list[Envelope], records: list[ResultRecord], expires_at: float
    ) -> list[Outgoing]:
        """Encode each envelope; one that cannot be (too large, a value JSON cannot hold) is
        recorded as failed instead of holding up the rest."""
        app = self.app
        outgoing = []
        for envelope in envelopes:
            try:
                outgoing += app._outgoing(app._before_send([envelope]))
            except ConveyorError as exc:
                log.error("task %s[%s] cannot be sent: %s", envelope.task, envelope.id, exc)
                records.append(
                    ResultRecord(
                        id=envelope.id,
                        state=State.FAILURE,
                        task=envelope.task,
                        error_type=type(exc).__name__,
                        error_message=str(exc),
                        finished_at=time.time(),
                        updated_at=time.time(),
                        expires_at=expires_at,
                    )
                )
        return outgoing


def _chord(follow: Follow) -> ChordRef | None:
    workflow = follow.envelope.workflow
    return None if isinstance(workflow, msgspec.UnsetType) else workflow.chord


def _slot_value(slot: Slot) -> Any:
    if slot.ok:
        return msgspec.json.decode(slot.value)
    return {"error_type": slot.error_type, "error_message": slot.error_message, "task_id": slot.id}


def _start_errback(errback: Call, failed_id: str, sends: Sends, root: str, now: float) -> None:
    # One errback id per failed task: a chord whose members fail one by one calls it for each.
    digest = hashlib.blake2b(f"{errback.id}:{failed_id}".encode(), digest_size=16).hexdigest()
    call = msgspec.structs.replace(errback, id=digest)
    start(call, failed_id, sends, root_id=root, parent_id=failed_id, nonce=True, now=now)


def _failure(call: Call, follow: Follow, traceback: str, now: float) -> ResultRecord:
    return ResultRecord(
        id=call.id,
        state=State.FAILURE,
        task=call.task,
        error_type=follow.error_type,
        error_message=follow.error_message,
        traceback=traceback,
        finished_at=now,
        updated_at=now,
        expires_at=follow.expires_at,
    )
