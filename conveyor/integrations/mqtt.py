"""Publish to an MQTT broker from tasks, with paho-mqtt 2 (`pip install 'conveyor[mqtt]'`).

```python
@app.resource(check=lambda c: c.is_connected())
def mqtt() -> MqttPublisher:
    return MqttPublisher("mqtt://127.0.0.1:1883")

@app.task(autoretry_for=(MqttError,), retry_backoff=True, max_retries=10)
def publish(topic: str, payload: str) -> None:
    mqtt().publish(topic, payload, qos=2)
```

A publisher connects in its constructor, keeps the connection on paho's own network thread and
reconnects on its own. A QoS 1 or 2 `publish` returns only once the broker acknowledged the
message; otherwise it raises, so a task never reports as sent what the broker did not confirm.

```
ConveyorError
└── MqttError                 anything that went wrong talking to the MQTT broker
    ├── MqttConnectError      no connection: refused, unreachable, or lost and not back in time
    └── MqttTimeout           the broker did not acknowledge a QoS 1/2 message in time
```
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from conveyor.errors import ConfigurationError, ConveyorError
from conveyor.redact import redact_text, redact_url

try:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
except ImportError as exc:  # pragma: no cover - depends on the extras installed
    raise ImportError(
        "conveyor.integrations.mqtt needs paho-mqtt 2: pip install 'conveyor[mqtt]'"
    ) from exc

__all__ = ["MqttConnectError", "MqttError", "MqttPublisher", "MqttTimeout"]

log = logging.getLogger("conveyor.mqtt")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# paho waits this long before the first reconnection attempt, doubling up to the maximum.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


class MqttError(ConveyorError):
    """Publishing to the MQTT broker failed; a task can retry on it (`autoretry_for`)."""


class MqttConnectError(MqttError):
    """No connection to the broker: refused, unreachable, or lost and not back in time."""


class MqttTimeout(MqttError):
    """The broker did not acknowledge a QoS 1 or 2 message within the timeout.

    The message was not confirmed. It may still reach the broker later, so a retry can deliver
    it twice: subscribers of retried tasks should tolerate duplicates.
    """


@dataclass(frozen=True)
class _Broker:
    """Where and how to connect, read from an `mqtt://` or `mqtts://` URL."""

    host: str
    port: int
    tls: bool
    ca: str | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """`host:port` for messages and logs: never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_url(url: str) -> _Broker:
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"cannot read MQTT URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigurationError(
            f"MQTT URL {shown!r} must start with mqtt:// (or mqtts:// for TLS), "
            "as in mqtt://user:pass@host:1883"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigurationError(
            f"MQTT URL {shown!r} has a bad port: write a number from 1 to 65535, or leave it out "
            f"for {DEFAULT_PORTS['mqtt']} (mqtt://) or {DEFAULT_PORTS['mqtts']} (mqtts://)"
        )
    if not parts.hostname:
        raise ConfigurationError(f"MQTT URL {shown!r} names no host, as in mqtt://host:1883")
    if parts.path not in ("", "/"):
        raise ConfigurationError(
            f"MQTT URL {shown!r} has a path, {parts.path!r}: an MQTT broker URL has none "
            "(the topic goes to publish())"
        )
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - {"ca", "insecure"})
    if unknown:
        raise ConfigurationError(
            f"MQTT URL {shown!r} has an unknown option {unknown[0]!r}: the options are "
            "ca=/path/to/ca.pem and insecure=1, for mqtts:// only"
        )
    if options and scheme != "mqtts":
        raise ConfigurationError(
            f"MQTT URL {shown!r}: ca= and insecure= configure TLS; use mqtts:// for TLS"
        )
    insecure = options.get("insecure", "0").lower()
    if insecure not in _TRUE | _FALSE:
        raise ConfigurationError(
            f"MQTT URL {shown!r}: insecure= takes 1 or 0, not {options['insecure']!r}"
        )
    ca = options.get("ca") or None
    if ca is not None and not os.path.isfile(ca):
        raise ConfigurationError(f"MQTT URL {shown!r}: the CA file {ca!r} does not exist")
    return _Broker(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        tls=scheme == "mqtts",
        ca=ca,
        insecure=insecure in _TRUE,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
    )


def _tls_context(broker: _Broker) -> ssl.SSLContext:
    """The system's default context (or one trusting `ca=` instead), checking the host name."""
    try:
        context = ssl.create_default_context(cafile=broker.ca)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot load the CA file {broker.ca!r} for the MQTT broker at {broker.where}: "
            f"{exc}; give a PEM file of CA certificates"
        ) from None
    if broker.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _default_client_id() -> str:
    # Unique per process: a broker disconnects a client whose id another client takes over.
    return f"conveyor-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class MqttPublisher:
    """One connection to an MQTT broker, shared by the threads of one process.

    `url` is `mqtt://[user:pass@]host[:1883]` or `mqtts://[user:pass@]host[:8883]` (TLS with the
    system's CAs and a host name check; `?ca=/path/ca.pem` trusts that CA instead, and
    `?insecure=1` skips verification, which lets anyone on the path read and forge messages).
    The constructor connects, waiting up to `connect_timeout` seconds, or raises
    `MqttConnectError`; a bad URL raises `ConfigurationError`. `client_id` defaults to one
    unique to this process. `keepalive` is the MQTT keep-alive in seconds.

    The connection lives on paho's network thread, which reconnects on its own after a loss.
    A publisher belongs to the process that created it: in a forked child it refuses to publish
    (make it an `@app.resource`, which creates one per process).
    """

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        connect_timeout: float = 5.0,
        publish_timeout: float = 10.0,
        keepalive: int = 30,
    ) -> None:
        broker = _parse_url(url)
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("publish_timeout", publish_timeout),
        ):
            if not value > 0:
                raise ConfigurationError(f"MqttPublisher: {name} must be above 0, not {value!r}")
        if isinstance(keepalive, bool) or not isinstance(keepalive, int) or keepalive < 0:
            raise ConfigurationError(
                f"MqttPublisher: keepalive must be a whole number of seconds (0: none), "
                f"not {keepalive!r}"
            )
        self.client_id: str = client_id or _default_client_id()
        self.publish_timeout = publish_timeout
        self._where = broker.where
        self._pid = os.getpid()
        self._state = threading.Condition()  # guards the fields below; callbacks notify it
        self._connected = False
        self._connections = 0
        self._failure: str | None = None  # why the first connection failed
        self._closed = False

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.connect_timeout = connect_timeout
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set_context(_tls_context(broker))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        self._client = client
        self._connect(broker, connect_timeout, keepalive)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._connected else "disconnected"
        return f"<MqttPublisher {self._where} client_id={self.client_id!r} {state}>"

    def __enter__(self) -> MqttPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connections(self) -> int:
        """How many times this publisher established a connection (the broker accepted it)."""
        return self._connections

    def is_connected(self) -> bool:
        """True while connected, in the process that created this publisher, and not closed."""
        return self._connected and not self._closed and os.getpid() == self._pid

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 2,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish `payload` (bytes, or text sent as UTF-8) to `topic`.

        QoS 0 hands the message to the client and returns. QoS 1 and 2 return once the broker
        acknowledged it (PUBACK, or PUBCOMP for QoS 2). Within `timeout` seconds (default:
        `publish_timeout`) this waits for a lost connection to come back, then for the
        acknowledgement: `MqttConnectError` if the connection did not come back, `MqttTimeout`
        if the acknowledgement did not come. Safe to call from several threads at once.
        """
        if os.getpid() != self._pid:
            raise MqttError(
                f"this MQTT publisher (for {self._where}) was created in process {self._pid}, "
                "before a fork: its connection belongs to that process. Create the publisher in "
                "the process that uses it, for example with @app.resource"
            )
        if isinstance(qos, bool) or qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(
                f"cannot publish to {topic!r}: a topic to publish to is not empty and has no "
                "wildcards (+ or #)"
            )
        if not isinstance(payload, (bytes, bytearray, str)):
            raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")
        limit = self.publish_timeout if timeout is None else timeout
        if not limit >= 0:
            raise ValueError(f"timeout must be 0 or more seconds, not {timeout!r}")
        deadline = time.monotonic() + limit
        self._wait_connected(deadline, limit)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The connection dropped between the check above and the hand-over.
            raise MqttConnectError(
                f"the connection to the MQTT broker at {self._where} dropped while publishing to "
                f"{topic!r} ({paho.error_string(info.rc)}); it reconnects in the background: "
                "retry (the message was not confirmed, and may still arrive after reconnecting)"
            )
        if qos == 0:
            return
        try:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.0))
            published = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise MqttError(
                f"paho did not publish to {topic!r} on the MQTT broker at {self._where}: "
                f"{redact_text(str(exc))}; retry"
            ) from None
        if not published:
            ack = "PUBACK" if qos == 1 else "PUBCOMP"
            raise MqttTimeout(
                f"the MQTT broker at {self._where} did not acknowledge (no {ack}) the QoS {qos} "
                f"message to {topic!r} within {limit}s; it was not confirmed, so retry it (it may "
                "still arrive, so a retry can deliver it twice), or raise the timeout"
            )

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread; calling it again does nothing.

        In a forked child it only marks the publisher closed: the connection is the parent's.
        """
        if os.getpid() != self._pid:
            self._closed = True
            return
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.notify_all()
        self._client.disconnect()
        self._client.loop_stop()

    # Connecting

    def _connect(self, broker: _Broker, timeout: float, keepalive: int) -> None:
        deadline = time.monotonic() + timeout
        try:
            # The TCP connection, TLS handshake and CONNECT happen here, within `timeout`;
            # the answer (CONNACK) comes on the network thread.
            self._client.connect(broker.host, broker.port, keepalive)
        except OSError as exc:
            raise MqttConnectError(
                f"cannot connect to the MQTT broker at {self._where}: "
                f"{redact_text(str(exc)) or type(exc).__name__}; check that it runs and listens "
                "there (and, for mqtts://, that its certificate is trusted and names that host)"
            ) from None
        self._client.loop_start()
        with self._state:
            self._state.wait_for(
                lambda: self._connected or self._failure is not None,
                timeout=max(deadline - time.monotonic(), 0.0),
            )
            connected, failure = self._connected, self._failure
        if connected:
            return
        self.close()
        if failure is not None:
            raise MqttConnectError(f"the MQTT broker at {self._where} {failure}")
        raise MqttConnectError(
            f"the MQTT broker at {self._where} did not accept the connection within {timeout}s: "
            "check that an MQTT broker (not another service) listens there, or raise "
            "connect_timeout"
        )

    def _wait_connected(self, deadline: float, limit: float) -> None:
        with self._state:
            self._state.wait_for(
                lambda: self._connected or self._closed,
                timeout=max(deadline - time.monotonic(), 0.0),
            )
            if self._closed:
                raise MqttError(
                    f"this MQTT publisher (for {self._where}) is closed: create a new one "
                    "(an @app.resource does when its check fails)"
                )
            if not self._connected:
                raise MqttConnectError(
                    f"no connection to the MQTT broker at {self._where} for {limit}s (it "
                    f"reconnects in the background, every {RECONNECT_MIN_S}-{RECONNECT_MAX_S}s): "
                    "check that the broker runs; retry"
                )

    # paho callbacks: they run on paho's network thread

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            with self._state:
                first = self._connections == 0
                if first and self._failure is None:
                    self._failure = (
                        f"refused the connection ({reason_code}): check the user name and "
                        "password in the URL and the broker's access rules"
                    )
                self._state.notify_all()
            if not first:
                log.warning(
                    "the MQTT broker at %s refused to reconnect (%s); retrying",
                    self._where,
                    reason_code,
                )
            return
        with self._state:
            self._connected = True
            self._connections += 1
            count = self._connections
            self._state.notify_all()
        if count == 1:
            log.info("connected to the MQTT broker at %s", self._where)
        else:
            log.info("reconnected to the MQTT broker at %s (connection %d)", self._where, count)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        with self._state:
            first = self._connections == 0
            if first and self._failure is None:
                self._failure = "could not be reached: check that it runs and listens there"
            self._state.notify_all()
        if not first:
            log.info("cannot reach the MQTT broker at %s yet; retrying", self._where)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._state:
            was_connected, closing = self._connected, self._closed
            self._connected = False
            if self._connections == 0 and self._failure is None:
                self._failure = (
                    f"closed the connection before accepting it ({reason_code}): check that it "
                    "is an MQTT broker, and use mqtts:// for a TLS listener"
                )
            self._state.notify_all()
        if not was_connected:
            return
        if closing:
            log.info("disconnected from the MQTT broker at %s", self._where)
        else:
            log.warning(
                "lost the connection to the MQTT broker at %s (%s); reconnecting in the background",
                self._where,
                reason_code,
            )
