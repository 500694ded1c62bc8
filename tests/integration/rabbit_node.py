"""A private RabbitMQ node for tests that break their broker: closed connections, restarts.

The shared server on 127.0.0.1:5672 (node `rabbit@localhost`) is never touched. The private node
has its own name, AMQP port, distribution port, epmd (on a port of its own, started here), Erlang
cookie, config, data and log directories, all under one temporary directory, and it listens on
127.0.0.1 only. Its scripts are run directly, not through Debian's wrapper, which would switch to
the `rabbitmq` user and read `/etc/rabbitmq/rabbitmq-env.conf` (and with it the shared node's name).

Every process started here carries `MARK` in its environment, so cleanup finds the leftovers
(beam.smp, epmd, erl_child_setup, inet_gethost) by that mark and never by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import wait_for

MARK = "CONVEYOR_TEST_RABBIT_NODE"
# rabbitmqctl's own distribution listener takes a port from this range: never hand it out.
CTL_DIST_PORTS = range(35672, 35683)
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
CTL_TIMEOUT_S = 60.0


def find_scripts() -> Path | None:
    """The directory of the real `rabbitmq-server` and `rabbitmqctl` scripts, if installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib/rabbitmq/bin"])
    for candidate in (shutil.which("rabbitmq-server", path=search), *_packaged_servers()):
        if candidate is None:
            continue
        real = Path(candidate).resolve()
        # Debian's /usr/sbin/rabbitmq-server resolves to rabbitmq-script-wrapper: skip it.
        if real.name == "rabbitmq-server" and (real.parent / "rabbitmqctl").exists():
            return real.parent
    return None


def _packaged_servers() -> list[str]:
    return [str(p) for p in sorted(Path("/usr/lib/rabbitmq/lib").glob("*/sbin/rabbitmq-server"))]


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now, distinct, outside rabbitmqctl's range."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            held.append(sock)  # held open until all are chosen, so no port comes back twice
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in CTL_DIST_PORTS:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class RabbitNode:
    """One private RabbitMQ node; `start`, break it, `stop` or `kill`, `start` again, `cleanup`."""

    def __init__(self, scripts: Path, root: Path) -> None:
        self.scripts = scripts
        self.root = root
        self.name = f"conveyor-test-{secrets.token_hex(4)}@localhost"
        self.port, self.dist_port, self.epmd_port = _free_ports(3)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._env = self._prepare()

    def _prepare(self) -> dict[str, str]:
        root = self.root
        home = root / "home"
        for name in ("home", "mnesia", "log", "conf.d"):
            (root / name).mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))  # its own cookie: no CLI reaches the wrong node
        cookie.chmod(0o400)
        (root / "rabbitmq-env.conf").write_text("")
        (root / "enabled_plugins").write_text("[].\n")  # no management plugin on port 15672
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.file.level = info\n"
            "log.console = false\n"
        )
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            MARK: self.name,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(root / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Never start (or use) the shared epmd; distribution on loopback only.
            "ERL_FLAGS": "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def running(self) -> bool:
        """True while the node's server process is alive."""
        return self._server is not None and self._server.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Start the node (on the data it has, if any) and wait until it serves; the seconds."""
        began = time.monotonic()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self._env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        pid_file = self.root / "rabbitmq.pid"
        pid_file.unlink(missing_ok=True)
        with (self.root / "server.log").open("ab") as log:
            self._server = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                cwd=self.root,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for `kill`
            )

        def launched() -> bool:
            if not self.running:
                raise RuntimeError(f"RabbitMQ node {self.name} exited\n{self.log_tail()}")
            return pid_file.exists()

        wait_for(launched, timeout=timeout, what=f"RabbitMQ node {self.name} writing its pid")
        try:
            # Waits for this pid's distribution, then for the rabbit application to start.
            self.ctl("wait", str(pid_file), "--timeout", str(int(timeout)), timeout=timeout + 10)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return time.monotonic() - began

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT_S) -> str:
        """`rabbitmqctl -n <this node> ...`; its output, or an error with it."""
        done = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", self.name, *args],
            cwd=self.root,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def close_all_connections(self, reason: str = "chaos test") -> int:
        """Have the node close every client connection; how many it closed."""
        out = self.ctl("close_all_connections", reason)
        closed = [line for line in out.splitlines() if line.startswith("Closed ")]
        return int(closed[-1].split()[1]) if closed else 0

    def unacknowledged(self, queue: str) -> int:
        """Messages of `queue` delivered and not yet acknowledged."""
        out = self.ctl(
            "list_queues", "--silent", "--no-table-headers", "name", "messages_unacknowledged"
        )
        counts = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
        return int(counts[queue])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """A clean shutdown (clients are told): `rabbitmqctl stop`, waiting for the process."""
        if not self.running:
            return
        assert self._server is not None
        try:
            self.ctl("stop", str(self.root / "rabbitmq.pid"), timeout=timeout)
            self._server.wait(timeout)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """A crash: SIGKILL the server's whole process group; clients see the socket die."""
        server = self._server
        if server is None or server.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(STOP_TIMEOUT_S)
        # beam.smp is the script's child: gone only once its sockets are closed.
        epmd = {self._epmd.pid} if self._epmd is not None else set()
        wait_for(
            lambda: not set(_marked(self.name)) - epmd,
            timeout=STOP_TIMEOUT_S,
            what=f"the processes of RabbitMQ node {self.name} to exit",
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output and log, for failure messages."""
        out = []
        for path in (self.root / "server.log", *sorted((self.root / "log").glob("*.log"))):
            with suppress(OSError):
                out += [f"--- {path.name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    def cleanup(self) -> None:
        """Stop the node, its epmd and anything else it started, and delete its directories."""
        try:
            self.kill()  # no need to be gentle with data about to be deleted
        finally:
            if self._epmd is not None and self._epmd.poll() is None:
                self._epmd.kill()
                self._epmd.wait(STOP_TIMEOUT_S)
            _kill_marked(self.name)
            shutil.rmtree(self.root, ignore_errors=True)


def _marked(name: str) -> list[int]:
    """Live processes whose environment carries this node's mark (a zombie's reads empty)."""
    mark = f"{MARK}={name}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if mark in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_marked(name: str) -> None:
    """SIGKILL whatever this node left running (nothing, normally)."""
    for pid in _marked(name):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def private_node() -> Iterator[RabbitNode]:
    """A started private node, cleaned up on the way out (a failing test included).

    Without RabbitMQ installed: a skip locally, a failure in CI.
    """
    scripts = find_scripts()
    if scripts is None or shutil.which("epmd") is None:
        missing = "rabbitmq-server" if scripts is None else "epmd (Erlang)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed, and CI needs it for a private RabbitMQ node")
        pytest.skip(f"{missing} is not installed: these tests start a private RabbitMQ node")
    node = RabbitNode(scripts, Path(tempfile.mkdtemp(prefix="conveyor-rabbit-")))
    try:
        node.start()
        yield node
    finally:
        node.cleanup()
