"""Counts what arrives: an MQTT subscriber on PREFIX/# at QoS 2, in a process of its own.

It runs in a spawned process, not in the one that forks the worker's children, so its socket is
not one the children would inherit (the worker warns about those, and rightly). It counts
deliveries per reading id in shared memory, which the parent reads whenever it likes.

`flush()` is the barrier that makes counting exact without sleeping: the subscriber publishes a
marker to its own topic and waits for it to come back. MQTT brokers route one connection's
messages in order, and Mosquitto queues each subscriber's messages in the order it released
them, so once the marker is back, every message the broker confirmed before it has arrived.

Mosquitto keeps only 20 messages in flight to a client that states no receive maximum (its
`max_inflight_messages`), queues 1000 more and drops the rest: a subscriber that falls behind
under load would lose messages. So by default it speaks MQTT 5 and asks for 65535 in flight.
With `persistent=True` it keeps a session instead, so that a broker restarted with persistence
hands over what was queued for it meanwhile: MQTT 3.1.1 with clean_session off, since
Mosquitto 2.0 restores 3.1.1 sessions from its database but not MQTT 5 ones. That broker should
allow enough in flight and queued (`max_inflight_messages 0`, `max_queued_messages 0`). `stop`
deletes the session.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import signal
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import RawArray
from typing import Any
from urllib.parse import urlsplit

_CONNECTIONS, _STRAYS = 0, 1


class SubscriberError(RuntimeError):
    """The subscriber could not connect, subscribe, or answer in time."""


@dataclass(frozen=True)
class Tally:
    """What the subscriber has seen of readings 0 to expected-1."""

    received: int  # messages, duplicates included
    delivered: int  # distinct readings
    duplicates: int  # received - delivered
    strays: int  # messages under the prefix that are no reading of this run
    connections: int  # times the subscriber connected (more than 1: it reconnected)


class Subscriber:
    """`with Subscriber(url, prefix, expected) as sub:` subscribed on entry, gone on exit."""

    def __init__(self, url: str, prefix: str, expected: int, *, persistent: bool = False) -> None:
        context = multiprocessing.get_context("spawn")
        self.prefix = prefix
        self._counts = RawArray(ctypes.c_int, max(expected, 1))  # one writer, no lock needed
        self._state = RawArray(ctypes.c_longlong, 2)
        commands, self._commands = context.Pipe(duplex=False)
        self._events, events = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_subscribe,
            args=(url, prefix, persistent, self._counts, self._state, commands, events),
            name="ble-mqtt-subscriber",
            daemon=True,
        )
        self._expected = expected
        self._marks = 0

    def __enter__(self) -> Subscriber:
        if self._process.pid is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        """Start the subscriber's process; return once the broker confirmed the subscription."""
        self._process.start()
        try:
            self._await("subscribed", 1, timeout)
        except BaseException:
            self.stop()
            raise

    def flush(self, timeout: float = 30.0) -> Tally:
        """Wait until everything the broker confirmed so far has arrived; the tally then."""
        self._marks += 1
        self._commands.send(("mark", self._marks))
        self._await("marked", self._marks, timeout)
        return self.tally()

    def tally(self) -> Tally:
        """The counts right now."""
        counts = self._counts[: self._expected]
        received = sum(counts)
        delivered = sum(1 for c in counts if c)
        strays, connections = self._state[_STRAYS], self._state[_CONNECTIONS]
        return Tally(received, delivered, received - delivered, strays, connections)

    def missing(self, ids: set[int]) -> list[int]:
        """The ids among `ids` that never arrived."""
        counts = self._counts
        return sorted(i for i in ids if not counts[i])

    def stop(self) -> None:
        """Unsubscribe for good (the broker drops the session) and end the process."""
        if self._process.pid is None:
            return
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # it ended meanwhile
                self._commands.send(("stop", 0))
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        self._commands.close()
        self._events.close()

    def _await(self, kind: str, value: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if not self._events.poll(min(remaining, 0.5)):
                    if not self._process.is_alive():
                        raise SubscriberError("the subscriber's process ended")
                    continue
                event, detail = self._events.recv()
            except EOFError:
                raise SubscriberError("the subscriber's process ended") from None
            if event == "error":
                raise SubscriberError(detail)
            if event == kind and detail >= value:
                return
        raise SubscriberError(f"the subscriber was not {kind} within {timeout}s")


def _subscribe(
    url: str,
    prefix: str,
    persistent: bool,
    counts: Any,
    state: Any,
    commands: Connection,
    events: Connection,
) -> None:
    """The subscriber's process: connect, subscribe, count; answer marks until told to stop."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it stops us after
    counter = _Counter(url, prefix, counts, state, events)
    client_id = f"ble-mqtt-subscriber-{uuid.uuid4().hex[:12]}"
    properties = None
    if persistent:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    else:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.ReceiveMaximum = 65535
    client.reconnect_delay_set(1, 2)
    client.on_connect = counter.on_connect
    client.on_subscribe = counter.on_subscribe
    client.on_message = counter.on_message
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 1883
    try:
        client.connect(host, port, 30, properties=properties)
    except OSError as exc:
        events.send(("error", f"cannot connect the subscriber to {url}: {exc}"))
        return
    client.loop_start()
    try:
        while True:
            try:
                command, value = commands.recv()
            except EOFError:  # the parent is gone
                break
            if command == "stop":
                break
            client.publish(counter.marker, str(value), qos=2)
    finally:
        client.disconnect()
        client.loop_stop()
    if persistent:  # a clean session under the same id replaces the kept one, then ends
        wipe = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        with contextlib.suppress(OSError):
            wipe.connect(host, port, 30)
            wipe.loop(2.0)  # the CONNACK
            wipe.disconnect()


class _Counter:
    """The subscriber's paho callbacks: they run on paho's network thread."""

    def __init__(self, url: str, prefix: str, counts: Any, state: Any, events: Connection):
        self.url = url
        self.prefix = prefix
        self.marker = f"{prefix}/_mark"
        self.counts = counts
        self.state = state
        self.events = events

    def on_connect(self, client: Any, _: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.events.send(("error", f"the MQTT broker at {self.url} refused: {reason}"))
            return
        self.state[_CONNECTIONS] += 1
        client.subscribe(f"{self.prefix}/#", qos=2)

    def on_subscribe(self, client: Any, _: Any, mid: int, reasons: Any, props: Any) -> None:
        if any(r.is_failure for r in reasons):
            self.events.send(("error", f"subscribing to {self.prefix}/# refused: {reasons}"))
        else:
            self.events.send(("subscribed", self.state[_CONNECTIONS]))

    def on_message(self, client: Any, _: Any, message: Any) -> None:
        if message.topic == self.marker:
            self.events.send(("marked", int(message.payload)))
            return
        try:
            reading_id = json.loads(message.payload)["id"]
        except (ValueError, TypeError, KeyError):
            reading_id = None
        if isinstance(reading_id, int) and 0 <= reading_id < len(self.counts):
            self.counts[reading_id] += 1
        else:
            self.state[_STRAYS] += 1
