"""`amqps://` against the RabbitMQ server on 127.0.0.1:5672 (guest/guest), safe by default.

The shared server has no TLS listener and is never reconfigured, so each test runs `TLSProxy`:
it accepts TLS on a free 127.0.0.1 port with a certificate made here by the `openssl` command,
and pipes the decrypted bytes to 127.0.0.1:5672. The certificates are throwaway: a CA, a server
certificate it signed for IP:127.0.0.1 and DNS:localhost, and one it signed for other.example
only. Each test uses a queue of its own and deletes it afterwards. Without a server these tests
skip locally and fail in CI; without `openssl` they skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiormq
import pytest
from conftest import delete_rabbitmq_queues, require_rabbitmq, run_bounded

from conveyor import Conveyor
from conveyor.brokers.base import Outgoing
from conveyor.brokers.rabbitmq import RabbitMQBroker
from conveyor.errors import BrokerError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
RABBITMQ = ("127.0.0.1", 5672)
PLAIN_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Never a real password: it must not reach the server, an error message or a log line.
PASSWORD = "s3cr3t-pw"
# How long a refused connection may take to fail: far below the broker's 60 s call timeout.
FAIL_FAST_S = 15.0


@pytest.fixture(scope="module", autouse=True)
def rabbitmq() -> None:
    require_rabbitmq()


@dataclass(frozen=True)
class Certificates:
    """A throwaway CA and two server certificates it signed (each with its key)."""

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
    """A server certificate for `san`, signed by the CA in `directory`; the chain and its key."""
    key, csr, cert = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    extensions = directory / f"{name}.ext"
    # What a strict verifier (Python 3.13's VERIFY_X509_STRICT) wants of a server certificate.
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
    # The server sends its certificate and the CA's, as a server with a private CA would.
    cert.write_text(cert.read_text() + (directory / "ca.pem").read_text())
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: it makes the test certificates")
    directory = tmp_path_factory.mktemp("tls")
    ca = directory / "ca.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", directory / "ca.key", "-out", ca, "-days", "2",
        "-subj", "/CN=conveyor throwaway test CA",
        "-addext", "basicConstraints = critical, CA:TRUE",
        "-addext", "keyUsage = critical, keyCertSign, cRLSign",
    )  # fmt: skip
    return Certificates(
        ca,
        _server_certificate(directory, "good", "IP:127.0.0.1, DNS:localhost"),
        _server_certificate(directory, "wrong-name", "DNS:other.example"),
    )


class TLSProxy:
    """Accepts TLS on a free 127.0.0.1 port and pipes the plain bytes to RabbitMQ on 5672.

    It runs an event loop on a thread of its own, so the broker's loop and a blocking worker
    are untouched. Each client whose TLS handshake completed gets its own RabbitMQ connection.
    """

    def __init__(self, chain: Path, key: Path) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(chain, key)
        self.handshakes = 0  # clients that completed the TLS handshake
        self.bytes_to_rabbitmq = 0
        self._sessions: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tls-proxy", daemon=True
        )
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._session, "127.0.0.1", 0, ssl=self._context)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(15)

    async def _session(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        self.handshakes += 1
        writers = [client_writer]
        try:
            rabbit_reader, rabbit_writer = await asyncio.open_connection(*RABBITMQ)
            writers.append(rabbit_writer)
            await asyncio.gather(
                self._pipe(client_reader, rabbit_writer, upstream=True),
                self._pipe(rabbit_reader, client_writer, upstream=False),
            )
        finally:
            for writer in writers:
                writer.close()
            for writer in writers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5)
            self._sessions.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream:
                    self.bytes_to_rabbitmq += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:  # a reset or a TLS error on either side ends the session
            pass
        finally:
            writer.close()  # one side is done: so is the other

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self) -> None:
        """Close the listener and every session, then end the proxy's thread."""
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
            self._loop.close()


@pytest.fixture
def proxy(certificates: Certificates) -> Iterator[Callable[[tuple[Path, Path]], TLSProxy]]:
    """Start a `TLSProxy` serving a certificate and key; each is stopped after the test."""
    started: list[TLSProxy] = []

    def start(certificate: tuple[Path, Path]) -> TLSProxy:
        started.append(TLSProxy(*certificate))
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"test-tls-{uuid.uuid4().hex[:10]}"
    yield name
    delete_rabbitmq_queues(name)


def _exists(queue: str) -> bool:
    """Whether RabbitMQ has the queue, asked over a plain connection of its own."""

    async def ask() -> bool:
        connection = await aiormq.connect(PLAIN_URL)
        try:
            channel = await connection.channel()
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            await connection.close()
        return True

    return asyncio.run(ask())


def _refused(url: str, queue: str, caplog: pytest.LogCaptureFixture) -> str:
    """Publish through `url`, which must fail to connect; the error message, checked for leaks."""
    caplog.set_level(logging.DEBUG)
    broker = RabbitMQBroker(url)
    try:
        with pytest.raises(BrokerError) as caught:
            broker.publish([Outgoing(queue, b"must not arrive")])
    finally:
        broker.close()
    message = str(caught.value)
    assert PASSWORD not in message
    assert PASSWORD not in repr(caught.value)
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)
    assert not _exists(queue), "nothing may be declared or published"
    return message


def test_a_task_round_trip_over_tls(
    proxy: Callable[[tuple[Path, Path]], TLSProxy], certificates: Certificates, queue: str
) -> None:
    server = proxy(certificates.good)
    url = f"amqps://guest:guest@127.0.0.1:{server.port}/?cafile={certificates.ca}"
    app = Conveyor("tls", broker=url, results="memory://", default_queue=queue)

    @app.task(name="tls.add")
    def add(x: int, y: int) -> int:
        return x + y

    try:
        results = add.map([(n, n) for n in range(20)])
        stats = run_bounded(app, concurrency=1, timeout=30)
        assert [r.get(timeout=5) for r in results] == [2 * n for n in range(20)]
        assert stats.succeeded == 20
    finally:
        app.close()
    assert server.handshakes >= 1 and server.bytes_to_rabbitmq > 0, "the traffic went over TLS"


@pytest.mark.timeout(FAIL_FAST_S)
def test_an_untrusted_certificate_is_refused_without_showing_the_password(
    proxy: Callable[[tuple[Path, Path]], TLSProxy],
    certificates: Certificates,
    queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = proxy(certificates.good)  # a valid certificate, but from a CA nobody trusts
    message = _refused(f"amqps://guest:{PASSWORD}@127.0.0.1:{server.port}/", queue, caplog)
    assert "certificate verify failed" in message
    assert "guest:***@" in message, "the user name is kept for diagnosis"
    assert (server.handshakes, server.bytes_to_rabbitmq) == (0, 0), "nothing was sent"


@pytest.mark.timeout(FAIL_FAST_S)
def test_a_certificate_for_another_host_is_refused(
    proxy: Callable[[tuple[Path, Path]], TLSProxy],
    certificates: Certificates,
    queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = proxy(certificates.wrong_name)  # signed by the trusted CA, for other.example
    url = f"amqps://guest:{PASSWORD}@127.0.0.1:{server.port}/?cafile={certificates.ca}"
    message = _refused(url, queue, caplog)
    assert "certificate verify failed" in message
    assert "mismatch" in message and "127.0.0.1" in message
    assert (server.handshakes, server.bytes_to_rabbitmq) == (0, 0), "nothing was sent"


@pytest.mark.parametrize("certificate", ["good", "wrong_name"])
def test_no_verify_ssl_is_the_explicit_opt_out(
    proxy: Callable[[tuple[Path, Path]], TLSProxy],
    certificates: Certificates,
    queue: str,
    certificate: str,
    poll: Callable[..., Any],
) -> None:
    """`no_verify_ssl=1` turns off certificate and hostname checks: for tests like this one only.

    Anyone between the worker and RabbitMQ could then read and change every task, and the
    password. The untrusted certificate and the one for another host are both accepted.
    """
    server = proxy(getattr(certificates, certificate))
    broker = RabbitMQBroker(f"amqps://guest:guest@127.0.0.1:{server.port}/?no_verify_ssl=1")
    try:
        broker.publish([Outgoing(queue, b"accepted")])
        (delivery,) = poll(lambda: broker.fetch([queue], 1) or None, what="the message")
        assert delivery.body == b"accepted"
        assert broker.ack([delivery]) == 1
    finally:
        broker.close()
    assert server.handshakes == 1 and server.bytes_to_rabbitmq > 0
