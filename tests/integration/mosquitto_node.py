"""Mosquitto for the MQTT tests: the shared broker's check, and private brokers to break.

The shared Mosquitto on 127.0.0.1:1883 is never stopped or reconfigured. A test that stalls,
stops or restarts its broker, or needs other settings (authentication, TLS), starts a private
`mosquitto` on a free 127.0.0.1 port, with its own config file in its own temporary directory,
and `cleanup` kills it and deletes the directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import wait_for

SHARED = ("127.0.0.1", 1883)
SHARED_URL = "mqtt://127.0.0.1:1883"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def require_mosquitto() -> None:
    """Skip the test when the shared Mosquitto is not running; fail it when CI is set."""
    try:
        socket.create_connection(SHARED, timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail("Mosquitto is not reachable on 127.0.0.1:1883, and CI needs it")
        pytest.skip(
            "Mosquitto is not running on 127.0.0.1:1883 (start it: mosquitto -d, or "
            "systemctl start mosquitto)"
        )


def free_port() -> int:
    """A port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class MosquittoNode:
    """One private `mosquitto`: `start`, `pause`/`resume` it, `stop`, `start` again, `cleanup`.

    `config` is added to the listener's settings (for example `allow_anonymous false`, or
    `certfile`/`keyfile` for TLS). Restarts keep the port.
    """

    def __init__(self, root: Path, config: str = "") -> None:
        self.root = root
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = root / "mosquitto.conf"
        # As root, mosquitto would switch to the `mosquitto` user, which cannot read this
        # private directory; keep the test's own user (a no-op when not root).
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.conf.write_text(
            f"user {user}\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type all\n"
            f"listener {self.port} 127.0.0.1\n"
            f"{config if config else 'allow_anonymous true'}\n"
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def running(self) -> bool:
        """True while the broker's process is alive (paused or not)."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the broker and wait until it accepts connections on its port."""
        with (self.root / "mosquitto.log").open("ab") as log:
            self._process = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def listening() -> bool:
            if not self.running:
                raise RuntimeError(f"mosquitto exited at start\n{self.log_tail()}")
            return _accepts(self.port)

        wait_for(listening, timeout=timeout, what=f"mosquitto listening on port {self.port}")

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its connections open and answers nothing."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._paused and self.running:
            assert self._process is not None
            os.kill(self._process.pid, signal.SIGCONT)
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stalled for the `with` block, resumed on the way out whatever happened."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """A clean shutdown (SIGTERM); clients see their connections close."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        self.resume()
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, and wait for the process to go."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)
        self._paused = False

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker's log, for failure messages."""
        with suppress(OSError):
            text = (self.root / "mosquitto.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def cleanup(self) -> None:
        """Kill the broker (resuming it first if paused) and delete its directory."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def private_mosquitto(config: str = "", root: Path | None = None) -> Iterator[MosquittoNode]:
    """A started private broker, cleaned up on the way out (a failing test included).

    Without the `mosquitto` command: a skip locally, a failure in CI. `root` is a directory of
    the test's (with files the config names); by default a new temporary one.
    """
    if shutil.which("mosquitto") is None:
        if os.environ.get("CI"):
            pytest.fail("the mosquitto command is not installed, and CI needs it")
        pytest.skip("the mosquitto command is not installed: these tests start a private broker")
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="conveyor-mosquitto-"))
    node = MosquittoNode(root, config)
    try:
        node.start()
        yield node
    finally:
        node.cleanup()
