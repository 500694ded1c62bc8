"""`MqttPublisher` against real Mosquitto brokers.

Deliveries go through the shared Mosquitto on 127.0.0.1:1883, each test on topics of its own,
checked by a paho subscriber. Tests that stall, stop or restart a broker, or need
authentication or TLS, start a private `mosquitto` (tests/integration/mosquitto_node.py). Without
the shared broker these tests skip locally and fail in CI; the URL checks need no broker.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import run_bounded, wait_for
from mosquitto_node import (
    SHARED_URL,
    MosquittoNode,
    free_port,
    private_mosquitto,
    require_mosquitto,
)
from paho.mqtt.enums import CallbackAPIVersion

from conveyor import Conveyor
from conveyor.errors import ConfigurationError, ConveyorError
from conveyor.integrations.mqtt import MqttConnectError, MqttError, MqttPublisher, MqttTimeout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Never a real password: it must not appear in an error message or a log line.
PASSWORD = "s3cr3t-mqtt-pw"
# How long a refused connection may take to fail.
FAIL_FAST_S = 2.0
RECEIVE_TIMEOUT_S = 10.0


@pytest.fixture
def shared() -> None:
    require_mosquitto()


@pytest.fixture
def topic() -> str:
    return f"conveyor-test/{uuid.uuid4().hex}"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="conveyor")
    return caplog


class Subscriber:
    """A paho client subscribed at QoS 2 to one topic; what arrives is queued in `messages`."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex}")

        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(topic, qos=2)

        client.on_connect = on_connect
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda _client, _userdata, message: self.messages.put(message)
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        if not subscribed.wait(RECEIVE_TIMEOUT_S):
            self.close()
            raise AssertionError(f"no SUBACK for {topic!r} on port {port}")

    def get(self, timeout: float = RECEIVE_TIMEOUT_S) -> paho.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def subscribed(topic: str, port: int = 1883) -> Iterator[Subscriber]:
    subscriber = Subscriber(port, topic)
    try:
        yield subscriber
    finally:
        subscriber.close()


@contextmanager
def publisher(url: str = SHARED_URL, **options: Any) -> Iterator[MqttPublisher]:
    pub = MqttPublisher(url, **options)
    try:
        yield pub
    finally:
        pub.close()


def assert_no_password(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error)
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


def in_thread(call: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


# The contract


def test_the_errors_are_one_tree_a_task_can_retry_on() -> None:
    assert issubclass(MqttError, ConveyorError)
    assert issubclass(MqttConnectError, MqttError)
    assert issubclass(MqttTimeout, MqttError)


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.usefixtures("shared")
def test_publish_reaches_a_subscriber_at_each_qos(qos: int, topic: str) -> None:
    with subscribed(topic) as subscriber, publisher() as pub:
        pub.publish(topic, b"\x00bytes\xff", qos=qos)
        pub.publish(topic, "text é", qos=qos)
        first, second = subscriber.get(), subscriber.get()
    assert (first.payload, first.qos, first.retain) == (b"\x00bytes\xff", qos, False)
    assert (second.payload, second.qos) == ("text é".encode(), qos)


@pytest.mark.usefixtures("shared")
def test_qos2_delivers_each_of_200_messages_exactly_once(topic: str) -> None:
    with subscribed(topic) as subscriber, publisher() as pub:
        for n in range(200):
            pub.publish(topic, str(n), qos=2)
        # One publisher, one topic, one QoS: the broker keeps the order, so once the end marker
        # is in, any duplicate of the 200 would be in too.
        pub.publish(topic, "end", qos=2)
        received = []
        while (payload := subscriber.get().payload.decode()) != "end":
            received.append(payload)
    assert received == [str(n) for n in range(200)]


@pytest.mark.usefixtures("shared")
def test_publish_is_safe_from_many_threads(topic: str) -> None:
    threads, each = 8, 25
    with subscribed(topic) as subscriber, publisher() as pub:

        def send(t: int) -> Callable[[], None]:
            def run() -> None:
                for n in range(each):
                    pub.publish(topic, f"{t}-{n}", qos=1)

            return run

        workers = [in_thread(send(t)) for t in range(threads)]
        for thread, errors in workers:
            thread.join(30)
            assert not thread.is_alive()
            assert errors == []
        received = {subscriber.get().payload.decode() for _ in range(threads * each)}
    assert received == {f"{t}-{n}" for t in range(threads) for n in range(each)}


@pytest.mark.usefixtures("shared")
def test_retain_keeps_the_message_for_later_subscribers(topic: str) -> None:
    with publisher() as pub:
        pub.publish(topic, "kept", qos=1, retain=True)
        try:
            with subscribed(topic) as subscriber:
                message = subscriber.get()
            assert (message.payload, message.retain) == (b"kept", True)
        finally:
            pub.publish(topic, b"", qos=1, retain=True)  # an empty retained message clears it


@pytest.mark.usefixtures("shared")
def test_state_client_id_and_close(logs: pytest.LogCaptureFixture) -> None:
    pub = MqttPublisher(SHARED_URL)
    other = MqttPublisher(SHARED_URL)
    try:
        assert pub.is_connected()
        assert pub.connections == 1
        assert pub.client_id.startswith(f"conveyor-{socket.gethostname()}-{os.getpid()}-")
        assert pub.client_id != other.client_id
        assert "connected" in repr(pub)
    finally:
        pub.close()
        other.close()
    assert not pub.is_connected()
    pub.close()  # idempotent
    with pytest.raises(MqttError, match="closed"):
        pub.publish("conveyor-test/closed", "x", qos=0)
    assert "connected to the MQTT broker at 127.0.0.1:1883" in logs.text
    assert "disconnected from the MQTT broker at 127.0.0.1:1883" in logs.text
    with publisher(client_id="conveyor-test-fixed") as named:
        assert named.client_id == "conveyor-test-fixed"


@pytest.mark.usefixtures("shared")
def test_bad_arguments_to_publish_raise_at_once() -> None:
    with publisher() as pub:
        with pytest.raises(ValueError, match="qos"):
            pub.publish("conveyor-test/x", "x", qos=3)
        with pytest.raises(TypeError, match="payload"):
            pub.publish("conveyor-test/x", 42, qos=0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="wildcards"):
            pub.publish("conveyor-test/#", "x", qos=0)  # no wildcards in a topic to publish to
        with pytest.raises(ValueError, match="topic"):
            pub.publish("", "x", qos=0)
        assert pub.is_connected()


@pytest.mark.usefixtures("shared")
def test_the_documented_resource_and_task_publish(app: Conveyor, topic: str) -> None:
    # The example of docs/mqtt.md, on a memory broker with a threads worker.
    @app.resource(check=lambda c: c.is_connected())
    def mqtt() -> MqttPublisher:
        return MqttPublisher("mqtt://127.0.0.1:1883")

    @app.task(autoretry_for=(MqttError,), retry_backoff=True, max_retries=10)
    def publish(topic: str, payload: str) -> None:
        mqtt().publish(topic, payload, qos=2)

    with subscribed(topic) as subscriber:
        for n in range(5):
            publish.delay(topic, f"reading {n}")
        stats = run_bounded(app, concurrency=2, timeout=30)
        received = {subscriber.get().payload for _ in range(5)}
    assert received == {f"reading {n}".encode() for n in range(5)}
    assert stats.succeeded == 5
    assert mqtt().connections == 1  # one publisher for the process, shared by its threads


# Failing to connect


def test_connection_refused_fails_fast_without_the_password(
    logs: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    began = time.monotonic()
    with pytest.raises(MqttConnectError) as caught:
        MqttPublisher(f"mqtt://user:{PASSWORD}@127.0.0.1:{port}")
    assert time.monotonic() - began < FAIL_FAST_S
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "refused" in str(caught.value).lower()
    assert_no_password(caught.value, logs)


def test_mqtts_defaults_to_port_8883(logs: pytest.LogCaptureFixture) -> None:
    with pytest.raises(MqttConnectError, match=r"127\.0\.0\.1:8883"):
        MqttPublisher(f"mqtts://user:{PASSWORD}@127.0.0.1", connect_timeout=2)


def test_refused_credentials_raise_a_connect_error_without_the_password(
    logs: pytest.LogCaptureFixture,
) -> None:
    # No password file and no anonymous access: this broker refuses everyone.
    with (
        private_mosquitto("allow_anonymous false") as node,
        pytest.raises(MqttConnectError) as caught,
    ):
        MqttPublisher(f"mqtt://someone:{PASSWORD}@127.0.0.1:{node.port}")
    message = str(caught.value)
    assert f"127.0.0.1:{node.port}" in message
    assert "Not authorized" in message
    assert "user name and password" in message
    assert_no_password(caught.value, logs)
    # The refused publisher left no network thread behind.
    assert not [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-conveyor")]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"http://user:{PASSWORD}@127.0.0.1:1883", "must start with mqtt://"),
        (f"amqp://user:{PASSWORD}@127.0.0.1:5672/", "must start with mqtt://"),
        (f"mqtt://user:{PASSWORD}@127.0.0.1:0", "bad port"),
        (f"mqtt://user:{PASSWORD}@127.0.0.1:70000", "bad port"),
        (f"mqtt://user:{PASSWORD}@127.0.0.1:port", "bad port"),
        (f"mqtt://user:{PASSWORD}@:1883", "names no host"),
        (f"mqtt://user:{PASSWORD}@127.0.0.1:1883/topic", "has a path"),
        (f"mqtt://user:{PASSWORD}@127.0.0.1:1883?tls=1", "unknown option 'tls'"),
        (f"mqtt://user:{PASSWORD}@127.0.0.1:1883?ca=/etc/hosts", "use mqtts://"),
        (f"mqtts://user:{PASSWORD}@127.0.0.1?insecure=maybe", "insecure= takes 1 or 0"),
        (f"mqtts://user:{PASSWORD}@127.0.0.1?ca=/nonexistent/ca.pem", "does not exist"),
        (f"mqtt://user:{PASSWORD}@[::1:1883", "cannot read MQTT URL"),
    ],
)
def test_bad_urls_name_the_problem_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem.replace("?", r"\?")) as caught:
        MqttPublisher(url)
    assert PASSWORD not in str(caught.value)


def test_a_ca_file_that_is_no_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="cannot load the CA file") as caught:
        MqttPublisher(f"mqtts://user:{PASSWORD}@127.0.0.1?ca={tmp_path / 'ca.pem'}")
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("connect_timeout", 0), ("publish_timeout", -1), ("keepalive", 1.5)],
)
def test_bad_options_are_configuration_errors(option: str, value: Any) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigurationError, match=option):
        MqttPublisher(SHARED_URL, **options)


@pytest.mark.usefixtures("shared")
def test_percent_encoded_credentials_are_decoded() -> None:
    # The shared broker lets anyone in, whatever the name: this checks the URL reads.
    with publisher(f"mqtt://us%40er:{PASSWORD}%2F%3A@127.0.0.1:1883") as pub:
        assert pub.is_connected()
        assert PASSWORD not in repr(pub)


def test_percent_decoded_password_reaches_the_broker(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed: it writes the broker's password file")
    password = f"{PASSWORD}/:@"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "us@er", password],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (tmp_path / "passwd").chmod(0o644)
    config = f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}"
    with private_mosquitto(config) as node:
        url = f"mqtt://us%40er:{PASSWORD}%2F%3A%40@127.0.0.1:{node.port}"
        with publisher(url) as pub:
            pub.publish("conveyor-test/auth", "x", qos=1)
        with pytest.raises(MqttConnectError, match="Not authorized"):
            MqttPublisher(f"mqtt://us%40er:wrong@127.0.0.1:{node.port}")


# A broker that stalls, stops and comes back


def test_publish_times_out_when_the_broker_stalls(logs: pytest.LogCaptureFixture) -> None:
    with private_mosquitto() as node:
        url = f"mqtt://user:{PASSWORD}@127.0.0.1:{node.port}"
        with publisher(url, publish_timeout=1.0) as pub:
            with node.paused():
                began = time.monotonic()
                with pytest.raises(MqttTimeout) as caught:
                    pub.publish("conveyor-test/stall", "lost?", qos=1)
                assert 1.0 <= time.monotonic() - began < 5.0
                with pytest.raises(MqttTimeout, match="PUBCOMP"):
                    pub.publish("conveyor-test/stall", "lost?", qos=2, timeout=0.5)
            # Resumed: the same connection carries on.
            pub.publish("conveyor-test/stall", "after", qos=1, timeout=10)
            assert pub.connections == 1
    message = str(caught.value)
    assert f"127.0.0.1:{node.port}" in message
    assert "PUBACK" in message
    assert "retry" in message
    assert_no_password(caught.value, logs)


def test_reconnects_after_the_broker_restarts(logs: pytest.LogCaptureFixture) -> None:
    with private_mosquitto() as node:
        with publisher(f"mqtt://user:{PASSWORD}@127.0.0.1:{node.port}") as pub:
            assert pub.connections == 1
            node.stop()
            wait_for(lambda: not pub.is_connected(), what="the publisher noticing the stop")
            # Down: a publish waits for the connection as long as its timeout, then gives up.
            with pytest.raises(MqttConnectError, match="no connection") as caught:
                pub.publish("conveyor-test/restart", "x", qos=1, timeout=0.3)
            node.start()
            wait_for(pub.is_connected, timeout=30, what="the publisher reconnecting")
            assert pub.connections == 2
            with subscribed("conveyor-test/restart", node.port) as subscriber:
                pub.publish("conveyor-test/restart", "after restart", qos=2)
                assert subscriber.get().payload == b"after restart"
        assert_no_password(caught.value, logs)
    assert f"lost the connection to the MQTT broker at 127.0.0.1:{node.port}" in logs.text
    assert f"reconnected to the MQTT broker at 127.0.0.1:{node.port}" in logs.text


def test_a_publish_while_down_waits_for_the_reconnection(topic: str) -> None:
    with private_mosquitto() as node, publisher(node.url) as pub:
        node.stop()
        wait_for(lambda: not pub.is_connected(), what="the publisher noticing the stop")
        # Retained, so a subscriber that arrives after the broker is back still sees it.
        thread, errors = in_thread(
            lambda: pub.publish(topic, "sent while down", qos=1, retain=True, timeout=30)
        )
        node.start()
        thread.join(35)
        assert not thread.is_alive()
        assert errors == []
        assert pub.connections == 2
        with subscribed(topic, node.port) as subscriber:
            assert subscriber.get().payload == b"sent while down"


@pytest.mark.usefixtures("shared")
def test_a_forked_child_cannot_use_its_parents_publisher(topic: str) -> None:
    with subscribed(topic) as subscriber, publisher() as pub:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 1
            try:
                try:
                    pub.publish(topic, "from the child", qos=1)
                except MqttError as exc:
                    code = 0 if "before a fork" in str(exc) and not pub.is_connected() else 2
                pub.close()  # must leave the parent's connection alone
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pub.is_connected()
        pub.publish(topic, "from the parent", qos=1)
        assert subscriber.get().payload == b"from the parent"
        assert pub.connections == 1


# TLS


@dataclass(frozen=True)
class Certificates:
    ca: Path
    good: tuple[Path, Path]  # for IP:127.0.0.1 and DNS:localhost
    wrong_name: tuple[Path, Path]  # for DNS:other.example only


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _server_certificate(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName = {san}\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", directory / "ca.pem", "-CAkey", directory / "ca.key",
        "-set_serial", str(secrets.randbits(63)), "-days", "2", "-extfile", extensions,
        "-out", cert,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: it makes the test certificates")
    directory = tmp_path_factory.mktemp("mqtt-tls")
    ca = directory / "ca.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", directory / "ca.key", "-out", ca, "-days", "2",
        "-subj", "/CN=conveyor throwaway MQTT test CA",
        "-addext", "basicConstraints = critical, CA:TRUE",
        "-addext", "keyUsage = critical, keyCertSign, cRLSign",
    )  # fmt: skip
    return Certificates(
        ca,
        _server_certificate(directory, "good", "IP:127.0.0.1, DNS:localhost"),
        _server_certificate(directory, "wrong-name", "DNS:other.example"),
    )


@contextmanager
def tls_mosquitto(certificate: tuple[Path, Path]) -> Iterator[MosquittoNode]:
    chain, key = certificate
    with private_mosquitto(f"certfile {chain}\nkeyfile {key}\nallow_anonymous true") as node:
        yield node


def test_mqtts_with_the_ca_publishes(certificates: Certificates, topic: str) -> None:
    with tls_mosquitto(certificates.good) as node:
        url = f"mqtts://user:{PASSWORD}@127.0.0.1:{node.port}?ca={certificates.ca}"
        with publisher(url) as pub:
            pub.publish(topic, "over TLS", qos=2)
            assert pub.is_connected()


def test_mqtts_refuses_an_untrusted_certificate(
    certificates: Certificates, logs: pytest.LogCaptureFixture
) -> None:
    with (
        tls_mosquitto(certificates.good) as node,
        pytest.raises(MqttConnectError, match="certificate verify failed") as caught,
    ):
        MqttPublisher(f"mqtts://user:{PASSWORD}@127.0.0.1:{node.port}")
    assert_no_password(caught.value, logs)


def test_mqtts_checks_the_host_name(certificates: Certificates) -> None:
    with tls_mosquitto(certificates.wrong_name) as node:
        with pytest.raises(MqttConnectError, match="certificate verify failed"):
            MqttPublisher(f"mqtts://127.0.0.1:{node.port}?ca={certificates.ca}")
        # insecure=1 skips verification: the wrong name (and an unknown CA) are accepted.
        with publisher(f"mqtts://127.0.0.1:{node.port}?insecure=1") as pub:
            pub.publish("conveyor-test/insecure", "x", qos=1)


def test_plain_mqtt_to_a_tls_listener_fails_with_advice(certificates: Certificates) -> None:
    with (
        tls_mosquitto(certificates.good) as node,
        pytest.raises(
            MqttConnectError, match=r"closed the connection before accepting it .* use mqtts://"
        ),
    ):
        MqttPublisher(f"mqtt://127.0.0.1:{node.port}", connect_timeout=3)
