"""The prefork pool's other processes: the zygote that forks children, and the child's loop.

The first zygote is forked when the pool starts, before the worker connects to its broker. A
zygote that dies is replaced by one started in a fresh interpreter that imports the app by its
path (`start_fresh_zygote`, the spawn start method's way), because by then the worker holds
broker connections that a fork would copy. Every child is forked from a zygote, never from the
worker itself, so no child inherits the worker's broker socket or any connection opened later.
The zygote is the children's parent: it reaps them, reports how each one ended, and kills one
when the worker asks (so a kill can never hit a recycled process id). It talks to the worker
over one Unix socket of packets:

    worker -> zygote   b"S" gen + two descriptors (the child's ends of its pipes): fork a child
                       b"K" gen: kill that child (SIGKILL)
    zygote -> worker   b"X" gen pid status: the child ended (a `waitpid` status)
                       b"R": a fresh zygote imported the app and is ready to fork
                       b"E" text: a fresh zygote could not start, and why (then it exits)

A child talks to the worker over its own two pipes, in frames of a 4-byte length and a msgpack
message (`Run` and `Revoke` in; `Up` once, then a `Done` per task, out). It has no broker: it
runs tasks and reports their outcomes. Before each task it compares a counter the worker bumps
after writing a `Revoke` (shared memory: `ChildOptions.revocations`); only when it moved does it
read its pipe without waiting, so a revoked job queued behind others is reported, not run.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from conveyor import _fork, log
from conveyor.brokers.base import Delivery
from conveyor.errors import SoftTimeLimitExceeded
from conveyor.log import LogSpec
from conveyor.message import decode
from conveyor.middleware.hooks import call
from conveyor.middleware.signals import worker_hooks
from conveyor.worker.execution import Job, Kind, Outcome, execute

if TYPE_CHECKING:
    from conveyor.app import Conveyor

_HEADER = struct.Struct(">I")
_GEN = struct.Struct(">Q")
_EXIT = struct.Struct(">Qqi")  # generation, pid, waitpid status


class Run(msgspec.Struct, array_like=True, tag=1):
    """Worker to child: run this message."""

    job: int
    queue: str
    body: bytes
    delivery_count: int


class Revoke(msgspec.Struct, array_like=True, tag=4):
    """Worker to child: these jobs, written before, were revoked: do not start them."""

    jobs: list[int]


class Up(msgspec.Struct, array_like=True, tag=2):
    """Child to worker: ready for work (WORKER_UP)."""

    pid: int


class Done(msgspec.Struct, array_like=True, tag=3):
    """Child to worker: how a task ended, and whether the child retires after it."""

    job: int
    kind: str
    value: bytes | None
    error_type: str | None
    error_message: str | None
    traceback: str | None
    countdown: float | None
    max_retries: int | None
    finished_at: float
    retire: str | None = None
    took: float = 0.0  # seconds the task ran, measured in the child

    def outcome(self) -> Outcome:
        """The outcome this message carries."""
        value = None if self.value is None else msgspec.Raw(self.value)
        return Outcome(
            _KINDS[self.kind],
            value,
            self.error_type,
            self.error_message,
            self.traceback,
            self.countdown,
            self.max_retries,
            self.finished_at,
            self.took,
        )


Message = Run | Up | Done | Revoke
_KINDS = {kind.value: kind for kind in Kind}  # a dict lookup, not an Enum call, per outcome
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def frame(message: Message) -> bytes:
    """A message as it goes down a pipe."""
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


class Frames:
    """Cuts a byte stream into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return the messages now complete."""
        buffer = self._buffer
        buffer += data
        out: list[Message] = []
        at = 0
        while len(buffer) - at >= 4:
            (size,) = _HEADER.unpack_from(buffer, at)
            if len(buffer) - at - 4 < size:
                break
            out.append(_decoder.decode(bytes(buffer[at + 4 : at + 4 + size])))
            at += 4 + size
        del buffer[:at]
        return out


# the zygote


def start_zygote(app: Conveyor, options: ChildOptions) -> tuple[int, socket.socket]:
    """Fork the zygote; the worker keeps the returned socket to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    trim_heap()
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 0
        try:
            ours.close()
            serve_zygote(theirs, app, options, forgotten=True)
        except BaseException:  # whatever happens, never return into the worker's code
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    theirs.close()
    return pid, ours


def trim_heap() -> None:
    """Hand the C allocator's free pages back to the kernel, before a fork.

    Free pages in the heap are inherited by every process forked from this one, and each
    process that reuses one then gets a copy of its own. There are megabytes of them after the
    imports when modules were compiled from source (no cached bytecode). glibc's `malloc_trim`
    releases them; elsewhere (musl) this does nothing.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)


class ZygoteSpec(msgspec.Struct, frozen=True):
    """What a zygote in a fresh interpreter needs: the app's path and the children's options."""

    app: str
    sys_path: list[str]
    control: int
    log_spec: LogSpec | None
    """How the worker configured logging (None: it did not, so neither does the zygote)."""
    max_tasks: int | None
    max_memory: int | None
    max_message_size: int
    revocations: int = -1

    def options(self) -> ChildOptions:
        """The children's options (`before_up`, a test hook, cannot cross into a new process)."""
        return ChildOptions(
            self.max_tasks, self.max_memory, self.max_message_size, revocations=self.revocations
        )


def start_fresh_zygote(
    app_path: str, options: ChildOptions
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start a zygote in a new interpreter that imports the app from `app_path`; the worker
    keeps the returned socket to it. Only that socket's other end crosses into the new process:
    the worker's broker connections are closed at the `exec`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spec = ZygoteSpec(
        app=app_path,
        sys_path=list(sys.path),
        control=theirs.fileno(),
        log_spec=log.applied(),
        max_tasks=options.max_tasks,
        max_memory=options.max_memory,
        max_message_size=options.max_message_size,
        revocations=options.revocations,
    )
    argument = msgspec.json.encode(spec).decode()
    command = [sys.executable, "-m", "conveyor.worker.pools._zygote", argument]
    passed = [theirs.fileno()] + ([options.revocations] if options.revocations >= 0 else [])
    try:
        process = subprocess.Popen(command, pass_fds=passed)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def spawn(control: socket.socket, generation: int, fds: Sequence[int]) -> None:
    """Ask the zygote for a child that gets `fds` (its task pipe's read end, result write end)."""
    socket.send_fds(control, [b"S" + _GEN.pack(generation)], list(fds))


def kill(control: socket.socket, generation: int) -> None:
    """Ask the zygote to kill a child; harmless if it has already ended."""
    control.send(b"K" + _GEN.pack(generation))


def read_exit(packet: bytes) -> tuple[int, int, int] | None:
    """(generation, pid, status) from a zygote packet, or None if it is not an exit report."""
    if packet[:1] != b"X" or len(packet) != 1 + _EXIT.size:
        return None
    generation, pid, status = _EXIT.unpack(packet[1:])
    return generation, pid, status


def _quiet_signals() -> tuple[int, int]:
    """Leave SIGINT and SIGTERM to the worker; wake the zygote's select on SIGCHLD."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    return wake_r, wake_w


def _drop_sockets(keep: Sequence[int]) -> None:
    """Point every inherited socket descriptor at /dev/null.

    Closing them would free their numbers while objects of the worker's (an SQLite or AMQP
    connection) still hold them and might close them later, when a number could belong to
    something new; /dev/null keeps each number taken and the socket itself is let go.
    """
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep or fd == null:
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def inherited_connections(ours: Iterable[tuple[str, int]] = ()) -> list[str]:
    """This process's open connections that a fork would hand to its children, described.

    Network connections and connections to named Unix sockets count; conveyor's own (to the
    `ours` endpoints), listening sockets and unnamed socket pairs (event-loop wake-ups) do not.
    """
    own: set[tuple[str, int]] = set()
    for host, port in ours:
        with contextlib.suppress(OSError):
            own |= {(str(info[4][0]), port) for info in socket.getaddrinfo(host, port)}
    connected: list[tuple[int, int, int, Any, Any]] = []  # fd, family, type, local, peer
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            connected.append((fd, sock.family, sock.type, sock.getsockname(), sock.getpeername()))
        except OSError:
            pass  # not connected: listening, or never was
        finally:
            sock.detach()
    # Both ends here: a pair a library made to wake its own thread, not a connection.
    locals_ = {local for _, family, _, local, _ in connected if family != socket.AF_UNIX}
    found = []
    for fd, family, kind, _, peer in connected:
        if family in (socket.AF_INET, socket.AF_INET6):
            if (peer[0], peer[1]) in own or peer in locals_:
                continue
            protocol = "tcp" if kind == socket.SOCK_STREAM else "udp"
            found.append(f"fd {fd}: {protocol} to {peer[0]}:{peer[1]}")
        elif family == socket.AF_UNIX and peer:
            path = peer.decode(errors="replace") if isinstance(peer, bytes) else peer
            found.append(f"fd {fd}: unix socket {path}")
    return found


def serve_zygote(
    control: socket.socket, app: Conveyor, options: ChildOptions, *, forgotten: bool = False
) -> None:
    """Fork a child for each request on `control`, reap them, and report how each ended.

    `forgotten`: this zygote was forked from the worker, so the `_fork` callbacks already ran
    here and its children have nothing to forget. A fresh zygote imported the app, whose
    module may have opened what its children must forget.
    """
    skip = _fork.nothing_to_forget if forgotten else contextlib.nullcontext
    signal.set_wakeup_fd(-1)
    wake_r, wake_w = _quiet_signals()
    _drop_sockets([control.fileno(), wake_r, wake_w, 0, 1, 2])
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, int] = {}  # generation -> pid
    generations: dict[int, int] = {}  # pid -> generation
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                _reap(control, children, generations)
                continue
            try:
                packet, fds, _, _ = socket.recv_fds(control, 64, 2)
            except OSError:
                packet, fds = b"", []
            if not packet:  # the worker is gone or done: so are its children
                _kill_all(children.values())
                return
            generation = _GEN.unpack(packet[1:9])[0]
            if packet[:1] == b"K":
                target = children.get(generation)
                if target is not None:
                    os.kill(target, signal.SIGKILL)
                continue
            with skip():
                pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    selector.close()
                    control.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    code = child_main(app, options, generation, fds[0], fds[1])
                except BaseException:
                    traceback.print_exc()  # a start-up hook failed, say: the worker logs the exit
                    code = 70
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            children[generation] = pid
            generations[pid] = generation


def _kill_all(pids: Iterable[int]) -> None:
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:  # reaped here, not left to whatever adopts them
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _reap(control: socket.socket, children: dict[int, int], generations: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        generation = generations.pop(pid, None)
        if generation is not None:
            children.pop(generation, None)
            with contextlib.suppress(OSError):
                control.send(b"X" + _EXIT.pack(generation, pid, status))


# the child


@dataclass(frozen=True)
class ChildOptions:
    """What a child needs to know besides the app."""

    max_tasks: int | None = None
    max_memory: int | None = None  # bytes of resident memory
    max_message_size: int = 16 * 1024 * 1024
    #: Called in the child before it reports WORKER_UP (tests use it to delay start-up).
    before_up: Callable[[], None] | None = None
    #: A memfd holding the counter of revocations the worker wrote (-1: none).
    revocations: int = -1


def child_main(
    app: Conveyor, options: ChildOptions, generation: int, tasks: int, results: int
) -> int:
    """Report WORKER_UP, then run each task the worker sends; return the exit code.

    The resources the tasks opened here are closed on the way out, when the child is replaced
    or the worker stops.
    """
    try:
        return _serve(app, options, tasks, results)
    finally:
        app.resources.close_all()


def _serve(app: Conveyor, options: ChildOptions, tasks: int, results: int) -> int:
    for hook in app.process_start_hooks:
        hook()
    # Again here: a fresh zygote imported the app anew, and start-up hooks may connect signals.
    app.hooks = worker_hooks(app.middleware)
    call(app.hooks.process_start, "process_start")
    if options.before_up is not None:
        options.before_up()
    frames = Frames()
    done = 0
    counter = _counter(options.revocations)
    seen = 0 if counter is None else counter[0]
    revoked: set[int] = set()
    try:
        _write(results, frame(Up(os.getpid())))
        while True:
            data = os.read(tasks, 1 << 16)
            if not data:  # the worker closed the pipe: nothing more to do
                return 0
            messages = frames.feed(data)
            if len(messages) > 1:
                _note_revoked(messages, revoked)  # a Revoke follows the Runs it names
            for message in messages:  # may grow as it goes: see below
                if not isinstance(message, Run):
                    if isinstance(message, Revoke):
                        revoked.update(message.jobs)
                    continue
                if counter is not None and counter[0] != seen:
                    # The worker revoked jobs since: its word may wait in the pipe.
                    seen = counter[0]
                    more = _waiting(tasks, frames)
                    _note_revoked(more, revoked)
                    messages.extend(more)
                if revoked and message.job in revoked:
                    revoked.discard(message.job)
                    _write(results, frame(_done(message.job, _REVOKED, None)))
                    continue
                outcome = _run(app, options, message)
                done += 1
                retire = _retirement(options, done)
                # Reported before the next job starts: if that one kills this process, the
                # worker knows exactly which job it was (and that this one finished).
                _write(results, frame(_done(message.job, outcome, retire)))
                if retire is not None:
                    return 0
    except BrokenPipeError:  # the worker is gone
        return 0


_REVOKED = Outcome(Kind.REVOKED, None, "TaskRevoked", "skipped before it started", "")


def _counter(fd: int) -> memoryview | None:
    """The revocation counter the worker shares with its children, mapped here."""
    if fd < 0:
        return None
    return memoryview(mmap.mmap(fd, mmap.PAGESIZE, prot=mmap.PROT_READ)).cast("Q")


def _note_revoked(messages: list[Message], revoked: set[int]) -> None:
    for message in messages:
        if isinstance(message, Revoke):
            revoked.update(message.jobs)


def _waiting(tasks: int, frames: Frames) -> list[Message]:
    """What the worker has written to the task pipe so far, read without waiting for more."""
    found: list[Message] = []
    os.set_blocking(tasks, False)
    try:
        while True:
            try:
                data = os.read(tasks, 1 << 16)
            except BlockingIOError:
                break
            if not data:  # the pipe's end: the next blocking read says so too
                break
            found += frames.feed(data)
    finally:
        os.set_blocking(tasks, True)
    return found


def _run(app: Conveyor, options: ChildOptions, message: Run) -> Outcome:
    try:
        # The signature is checked again rather than trusted: one decode serves both processes,
        # and an HMAC of a typical message costs a few microseconds.
        envelope = decode(message.body, max_size=options.max_message_size, signer=app.signer)
        task = app.tasks[envelope.task]
    except Exception as exc:  # the worker checked it; a child that disagrees says why
        return Outcome.failure(exc)
    delivery = Delivery(message.queue, message.body, None, message.delivery_count)
    job = Job(delivery, envelope, task, started_at=time.time())
    soft = task.options.soft_time_limit
    if soft is None or task.is_async:  # an async task's limits are asyncio timeouts
        # The hard limit is the worker's to enforce: it kills this process.
        return execute(job, hard_limit=False)
    return _with_soft_limit(job, soft)


def _with_soft_limit(job: Job, soft: float) -> Outcome:
    """Run a synchronous task with its soft limit as SIGALRM.

    The task runs on this process's main thread, so the signal interrupts even a blocking call
    (`time.sleep`, a socket read): it returns EINTR, and the handler raises
    `SoftTimeLimitExceeded` right there, in the task.
    """
    armed = True
    message = f"task {job.task.name} ran past its {soft}s soft limit"

    def alarm(signum: int, frame: object) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise SoftTimeLimitExceeded(message)

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, soft)
    outcome: Outcome | None = None
    try:
        outcome = execute(job, hard_limit=False, soft_limit=False)
    except SoftTimeLimitExceeded as exc:  # it landed just as the task returned
        if outcome is None:
            outcome = Outcome.failure(exc)
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return outcome


def _done(job: int, outcome: Outcome, retire: str | None) -> Done:
    value = None if outcome.value is None else bytes(outcome.value)
    return Done(
        job,
        outcome.kind.value,
        value,
        outcome.error_type,
        outcome.error_message,
        outcome.traceback,
        outcome.countdown,
        outcome.max_retries,
        outcome.finished_at,
        retire,
        outcome.took,
    )


def _retirement(options: ChildOptions, done: int) -> str | None:
    """Why this child should hand over to a fresh one now, if it should."""
    if options.max_tasks is not None and done >= options.max_tasks:
        return f"ran {done} tasks (max-tasks-per-child {options.max_tasks})"
    if options.max_memory is not None:
        rss = resident_memory()
        if rss > options.max_memory:
            return f"uses {rss:,} bytes (max-memory-per-child {options.max_memory:,})"
    return None


def resident_memory() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _write(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
