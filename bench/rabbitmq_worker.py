"""Workers on RabbitMQ: conveyor and its variants against Dramatiq, Celery and a dispatch probe.

`python -m bench.rabbitmq_worker` (part of `make bench`) measures each peer's worker, started
from its own command line, on the local RabbitMQ, and writes docs/benchmarks-rabbitmq-worker.md:
medians over `--repeat` rounds, peers alternating (the order rotates each round). Every
measurement runs in a process of its own (`--one MODE`), which writes the peer's app module into
a temporary directory, uses queues with a fresh unique name, starts the worker in a new process
group, and kills what is left of that group and deletes the queues whatever happens.

The workers have 2 slots each and late acks, run a no-op task and store no results:

- conveyor: `conveyor worker bench_app:app --pool POOL -c 2 --until-empty`, the task declared with
  `@app.task(acks_late=True)` on `Conveyor(..., ignore_results=True)`. POOL is `--conveyor-pool`,
  prefork by default; if the installed conveyor refuses prefork, threads (one process, 2 threads)
  and the report says so. Its prefetch starts at its slot count (2) and grows to 2 x 32 once its
  children have run a few no-op tasks (short tasks queue in a child up to a budget of 4 broker
  round trips). `conveyor` runs with the worker's defaults (`--loop auto`: uvloop when installed,
  as in the bench environment; new queues without `x-max-priority`); the variants change one
  thing each: `conveyor-asyncio` and `conveyor-uvloop` add `--loop asyncio` or `--loop uvloop`
  (the worker's parent process only: prefork children never run its loop), and `conveyor-p3`,
  `-p5`, `-p9` run on asyncio with `Conveyor(..., queue_max_priority=N)`, against `-p9` (the
  default of earlier releases); `conveyor-asyncio` is their 0. `conveyor-events` adds `--events`
  (task events and heartbeats published all the time, to an exchange no reader is bound to).
- Dramatiq: `dramatiq bench_app -p 2 -t 1`, and `-t 8` (2 processes), `RabbitmqBroker` with the
  default middleware; late acks are Dramatiq's default. Its prefetch is 2 per thread.
- Celery: `celery -A bench_app worker -P prefork -c 2 -l WARNING --without-gossip
  --without-mingle --without-heartbeat` with a unique node name, `task_acks_late=True`, no
  result backend, the default prefetch multiplier (4, so 8 messages). WARNING writes no log line
  per task; the three flags only concern talking to other workers.
- The parent-dispatch probe, `parent_dispatch.py N 2 32` from the probes folder beside the
  project (`../shared/probes/`, not part of it; skipped, and the report says so, when it is not
  there): one parent process consuming with aiormq feeds 2 forked children batches of up to 32
  bodies over pipes and multi-acks what they finished, on a queue without priorities, with no
  envelope checks, results, retries or limits. It bounds what a prefork parent's transport and
  dispatch can reach on this machine; the gap between it and conveyor is conveyor's own work.
  It fills its queue with pika first and times from the first task its children run to the
  N-th (its `process/s=`). No ledger: it only counts that its children reported N runs.

`--modes` chooses what runs (a comma-separated list of modes or groups: `all`, the default;
`quick`, conveyor and the probe; `peers`; `loops`, the two loop variants; `events`, conveyor
with and without `--events`; `priorities`, the priority variants and `conveyor-asyncio`). A run
that leaves out a peer says so in its report; ratios to a peer it did not measure are left
blank.

**Throughput**, timed the same way for every peer. The peer's own client fills the queue with N
tasks (conveyor `map()`, Dramatiq `send()`, Celery `apply_async()`), and the queue must hold
exactly N before the worker starts: neither publishing nor start-up is timed. The bench then
polls the queue every 5 ms with a passive `queue.declare`, which reports ready messages and
consumers but not unacknowledged messages (AMQP has no such count; the management plugin is not
used). The clock starts at the first poll that sees fewer than N ready, the worker's first
deliveries, and stops at the first that sees none. The last prefetch window (up to 64 tasks,
under 1% of the default N) is still being run then and is not timed. At both polls the bench
also reads the CPU time (user and system, in 10 ms steps, from `/proc/PID/stat`) of the process
it started: conveyor's and Celery's parent, which holds the broker connection and feeds the
children (Dramatiq's is a supervisor that consumes nothing, so its figure is not shown). That
CPU time per task depends less on what else the machine runs than the rate does. The same is
read for the RabbitMQ server's process when it runs on this machine (`beam.smp`): its CPU per
task includes whatever else the server did meanwhile, for other clients too.

Every throughput run is verified. Each task writes its number to a ledger (`bench/ledger.py`),
which must show every task run exactly once. conveyor must exit by itself (`--until-empty`) with
status 0, logging N succeeded and nothing failed, retried or dead-lettered; Dramatiq and Celery,
once the queue stayed empty for a second, get SIGTERM (a warm shutdown) and must exit with
status 0. Then nothing may be left in the queue (with late acks an unfinished message comes
back) nor in the peer's dead-letter and retry queues, and the worker's log may hold no error or
traceback. A conveyor worker must also name in its first line the loop its variant asked for.

**Idle memory**. The worker starts against its empty queue, without `--until-empty`. Once it
consumes (Dramatiq: both processes), the bench waits 2 s, then reads the worker's process tree
(the process it started and all its descendants, found in /proc) every 0.5 s until three
readings in a row, of the same processes, agree within 1%. The figures are the sums of `Pss` and
of `Rss` in `/proc/<pid>/smaps_rollup`. PSS divides each shared page among the processes mapping
it, so the memory a forked pool shares counts once (and libraries shared with processes outside
the tree count in part); RSS counts shared pages in every process. Measured for conveyor with
its defaults and the peers (`--no-memory`: not at all); not for conveyor's variants nor the
probe.

Every round runs each chosen mode's throughput, then each one's idle memory, in an order that
rotates by one each round; the figures are medians over the rounds, and every ratio is one of
medians from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ledger

URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks-rabbitmq-worker.md"
DISPATCH_PROBE = ROOT.parent / "shared" / "probes" / "parent_dispatch.py"
"""Beside the project, not in it: nothing here needs it, and the report says when it is absent."""
PROBE_BATCH = 32


@dataclass(frozen=True)
class Variant:
    """A conveyor worker that differs from the defaults in at most the loop and the queues."""

    label: str
    loop: str | None = None
    """`conveyor worker --loop`; None: the worker's default (auto)."""
    max_priority: int | None = None
    """`Conveyor(..., queue_max_priority=N)`; None: conveyor's default (none on a new queue)."""
    events: bool = False
    """`conveyor worker --events`: task events and heartbeats published all the time."""


VARIANTS = {
    "conveyor": Variant("conveyor"),
    "conveyor-asyncio": Variant("conveyor, `--loop asyncio`", "asyncio"),
    "conveyor-uvloop": Variant("conveyor, `--loop uvloop`", "uvloop"),
    **{
        f"conveyor-p{n}": Variant(f"conveyor, `--loop asyncio`, x-max-priority {n}", "asyncio", n)
        for n in (3, 5, 9)
    },
    "conveyor-events": Variant("conveyor, `--events`", events=True),
}
PEERS = ("dramatiq-t1", "dramatiq-t8", "celery")
PROBE = "parent-dispatch"
WORKERS = (*VARIANTS, *PEERS)
"""Modes that start a worker (`--one MODE`)."""
MODES = (*WORKERS, PROBE)
MEMORY_MODES = ("conveyor", *PEERS)
GROUPS = {
    "all": MODES,
    "quick": ("conveyor", PROBE),
    "peers": PEERS,
    "loops": ("conveyor-asyncio", "conveyor-uvloop"),
    "priorities": ("conveyor-asyncio", "conveyor-p3", "conveyor-p5", "conveyor-p9"),
    "events": ("conveyor", "conveyor-events"),
}
LABELS = {
    **{mode: variant.label for mode, variant in VARIANTS.items()},
    "dramatiq-t1": "Dramatiq, 1 thread each",
    "dramatiq-t8": "Dramatiq, 8 threads each",
    "celery": "Celery",
    PROBE: f"probe: `parent_dispatch.py N 2 {PROBE_BATCH}` (no priorities)",
}
DRAMATIQ_TARGET = 2.0
"""conveyor's throughput at least this multiple of Dramatiq's (the faster of its two)."""
CELERY_TARGET = 4.0
MEMORY_TARGET = 0.7
"""conveyor's idle PSS at most this multiple of Dramatiq's (the smaller of its two trees)."""
SLOTS = 2
POLL_S = 0.005
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
SETTLE_S = 1.0
IDLE_S = 2.0
STABLE_READINGS = 3
STABLE_SPREAD = 0.01
STABLE_TIMEOUT_S = 30.0
TROUBLE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")
CONVEYOR_SUMMARY = re.compile(
    r"worker stopped: (\d+) succeeded, (\d+) failed, (\d+) retried, (\d+) dead-lettered"
)
CONVEYOR_LOOP = re.compile(r"worker for \S+ starting: .*, loop (\w+)")
PROBE_RATE = re.compile(r"process/s=(\d+(?:\.\d+)?)")

CONVEYOR_APP = """\
from conveyor import Conveyor

app = Conveyor("bench", broker={url!r}, default_queue={queue!r}, ignore_results=True{settings})


@app.task(name="bench.noop", acks_late=True)
def noop(n: int) -> None:
    record(n)
"""
DRAMATIQ_APP = """\
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

dramatiq.set_broker(RabbitmqBroker(url={url!r}))


@dramatiq.actor(queue_name={queue!r}, actor_name="bench_noop")
def noop(n: int) -> None:
    record(n)
"""
CELERY_APP = """\
from celery import Celery

app = Celery("bench", broker={url!r})
app.conf.update(
    task_default_queue={queue!r},
    task_acks_late=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop", acks_late=True)
def noop(n: int) -> None:
    record(n)
"""


class BenchError(Exception):
    """A run failed or could not be verified: no report is written."""


@dataclass(frozen=True)
class Peer:
    """How one mode's worker is started, and the broker objects its run creates."""

    mode: str
    queue: str
    source: str
    command: list[str]
    side_queues: list[str]
    """Dead letters and retries: they must stay empty."""
    exchanges: list[str]
    """Exchanges named after this run's queue (shared ones are left alone)."""
    consumers: int
    """Consumers on `queue` once every worker process consumes."""


def make_peer(
    mode: str, queue: str, pool: str, until_empty: bool, conveyor_args: Sequence[str] = ()
) -> Peer:
    """The worker command and broker objects for `mode` on `queue` (`conveyor_args` go to
    `conveyor worker`'s command line: bench/logging_cost.py adds --quiet-tasks)."""
    bin_dir = Path(sys.executable).parent  # the bench venv's own console scripts
    if mode in VARIANTS:
        from conveyor.brokers.rabbitmq import BUCKETS_MS

        variant = VARIANTS[mode]
        command = [str(bin_dir / "conveyor"), "worker", "bench_app:app", "--pool", pool]
        command += ["-c", str(SLOTS), *(["--until-empty"] if until_empty else [])]
        command += ["--loop", variant.loop] if variant.loop else []
        command += ["--events"] if variant.events else []
        command += conveyor_args
        side = [f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)]
        settings = (
            "" if variant.max_priority is None else f", queue_max_priority={variant.max_priority}"
        )
        source = CONVEYOR_APP.replace("{settings}", settings)
        return Peer(mode, queue, source, command, side, [], 1)
    if mode.startswith("dramatiq-t"):
        threads = mode.removeprefix("dramatiq-t")
        command = [str(bin_dir / "dramatiq"), "bench_app", "-p", str(SLOTS), "-t", threads]
        return Peer(mode, queue, DRAMATIQ_APP, command, [f"{queue}.DQ", f"{queue}.XQ"], [], SLOTS)
    if mode == "celery":
        command = [str(bin_dir / "celery"), "-A", "bench_app", "worker", "-P", "prefork"]
        command += ["-c", str(SLOTS), "-l", "WARNING", "-n", f"{queue}@%h", "-Q", queue]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        return Peer(mode, queue, CELERY_APP, command, [], [queue], 1)
    raise ValueError(f"unknown mode {mode!r}")


# The broker, as any AMQP client sees it.


class Probe:
    """Passive declares and deletes on one connection of the bench's own."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.channel: Any = None

    async def __aenter__(self) -> Probe:
        import aiormq

        try:
            self.connection = await aiormq.connect(URL)
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise BenchError(f"RabbitMQ is not reachable at {URL}: {exc}") from None
        self.channel = await self.connection.channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    @property
    def server_version(self) -> str:
        return str(self.connection.server_properties.get("version", "?"))

    async def depth(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue, or None if it does not exist."""
        import aiormq

        try:
            ok = await self.channel.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self.channel = await self.connection.channel()
            return None
        return int(ok.message_count or 0), int(ok.consumer_count or 0)

    async def ready(self, name: str) -> int:
        found = await self.depth(name)
        return 0 if found is None else found[0]

    async def delete(self, queues: list[str], exchanges: list[str]) -> None:
        for queue in queues:
            await self.channel.queue_delete(queue)
        for exchange in exchanges:
            await self.channel.exchange_delete(exchange)


# Worker processes.


def start_worker(
    peer: Peer, workdir: Path, extra: dict[str, str] | None = None, tree_path: str | None = None
) -> subprocess.Popen[bytes]:
    """The worker in a new session: its process group is exactly the tree it starts.

    The peers' own variables are left out of its environment and `extra` (which may set some)
    added; `tree_path` puts another checkout's packages after the app module on its path.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONVEYOR_", "dramatiq_", "CELERY_"))
    }
    env.update(extra or {})
    env["PYTHONPATH"] = str(workdir) if tree_path is None else f"{workdir}:{tree_path}"
    with open(workdir / "worker.log", "wb") as log:
        return subprocess.Popen(
            peer.command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def processes() -> dict[int, tuple[int, int]]:
    """Every process on the machine: pid -> (parent pid, process group)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


def tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


def kill_group(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of the worker's process group (its pid is the group's id)."""
    for pid, (_, group) in processes().items():
        if group == worker.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(10)


async def wait_exit(worker: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while worker.poll() is None:
        if time.monotonic() > deadline:
            raise BenchError(f"the worker did not exit within {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return worker.returncode


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far, in seconds (10 ms steps)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rabbitmq_pid() -> int | None:
    """The local RabbitMQ server's process (Erlang's `beam.smp` running `rabbit`), if found."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                command = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command[0].endswith(b"beam.smp") and b"rabbit" in command:
                return int(entry.name)
    return None


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """Sum of Pss and of Rss over `pids`, in KiB."""
    pss = rss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                pss += int(value.split()[0])
            elif key == "Rss":
                rss += int(value.split()[0])
    return pss, rss


def task_lines(log: str) -> dict[str, int]:
    """What conveyor's worker logged about finished tasks: per-task lines and summaries."""
    lines = [line for line in log.splitlines() if " conveyor.worker.tasklog: " in line]
    summaries = sum(" tasks finished in the last " in line for line in lines)
    return {"task_lines": len(lines) - summaries, "summaries": summaries}


def log_text(workdir: Path) -> str:
    return (workdir / "worker.log").read_text(errors="replace")


def log_tail(workdir: Path, lines: int = 25) -> str:
    return "\n".join(log_text(workdir).splitlines()[-lines:])


# One measurement, in its own process.


def publish(mode: str, n: int) -> None:
    """N tasks with the peer's own client, from the same app module the worker imports."""
    app_module: Any = importlib.import_module("bench_app")
    if mode.startswith("conveyor"):
        app_module.noop.map([(i,) for i in range(n)])
        app_module.app.close()
    elif mode.startswith("dramatiq"):
        for i in range(n):
            app_module.noop.send(i)
        app_module.dramatiq.get_broker().close()
    else:
        for i in range(n):
            app_module.noop.apply_async((i,))
        app_module.app.close()


async def throughput(
    peer: Peer, worker: subprocess.Popen[bytes], n: int, workdir: Path, started: float
) -> dict[str, Any]:
    """Time the drain of a queue of n tasks (see the module docstring), then verify the run."""
    async with Probe() as probe:
        first = None
        server = rabbitmq_pid()
        cpu_first = cpu_last = broker_first = broker_last = 0.0
        deadline = time.monotonic() + START_TIMEOUT_S + n / 20
        while True:
            ready = await probe.ready(peer.queue)
            now = time.perf_counter()
            if first is None and ready < n:
                first, cpu_first = now, cpu_seconds(worker.pid)
                broker_first = cpu_seconds(server) if server else 0.0
            if ready == 0:
                cpu_last = cpu_seconds(worker.pid)
                broker_last = cpu_seconds(server) if server else 0.0
                break
            if worker.poll() is not None:
                raise BenchError(f"the worker exited early:\n{log_tail(workdir)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{ready} of {n} tasks still queued at the deadline")
            await asyncio.sleep(POLL_S)
        assert first is not None
        if now <= first:
            raise BenchError("the queue drained between two polls: use more --tasks")
        result = {
            "mode": peer.mode,
            "tasks": n,
            "per_s": round(n / (now - first), 1),
            "startup_s": round(first - started, 3),
            "parent_cpu_us": round((cpu_last - cpu_first) / n * 1e6, 1),
        }
        if server:
            result["broker_cpu_us"] = round((broker_last - broker_first) / n * 1e6, 1)
        if peer.mode.startswith("conveyor"):
            code = await wait_exit(worker, STOP_TIMEOUT_S)
            log = log_text(workdir)
            result["logged"] = task_lines(log)
            loop = CONVEYOR_LOOP.search(log)
            result["loop"] = loop[1] if loop else None
            variant = VARIANTS.get(peer.mode)
            if variant is not None and variant.loop and result["loop"] != variant.loop:
                raise BenchError(
                    f"{peer.mode} asked for --loop {variant.loop}, the worker ran on "
                    f"{result['loop']}:\n{log_tail(workdir)}"
                )
        else:
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < SETTLE_S:
                await asyncio.sleep(0.05)
                if await probe.ready(peer.queue):
                    raise BenchError("messages came back to the queue after it drained")
            worker.send_signal(signal.SIGTERM)
            code = await wait_exit(worker, STOP_TIMEOUT_S)
        left = {q: await probe.ready(q) for q in [peer.queue, *peer.side_queues]}
    check_stopped(peer, workdir, code, left, n)
    return result


def check_stopped(
    peer: Peer, workdir: Path, code: int | None, left: dict[str, int], n: int
) -> None:
    """What every run checks once its worker stopped: exit status 0, no message left in its
    queues, no error in its log, and conveyor's closing line counting exactly n succeeded and
    nothing failed, retried or dead-lettered. BenchError if one fails."""
    if code != 0:
        raise BenchError(f"the worker exited with status {code}:\n{log_tail(workdir)}")
    if any(left.values()):
        raise BenchError(f"messages left after the worker stopped: {left}")
    log = log_text(workdir)
    if TROUBLE.search(log):
        raise BenchError(f"the worker logged an error:\n{log_tail(workdir)}")
    if peer.mode.startswith("conveyor"):
        summary = CONVEYOR_SUMMARY.search(log)
        if summary is None:
            raise BenchError(f"no summary line in conveyor's log:\n{log_tail(workdir)}")
        counts = tuple(int(x) for x in summary.groups())
        if counts != (n, 0, 0, 0):
            raise BenchError(f"conveyor: expected {n} succeeded and nothing else: {summary[0]}")


async def stop_and_check(
    peer: Peer, worker: subprocess.Popen[bytes], workdir: Path, n: int
) -> None:
    """SIGTERM (a warm shutdown), wait for the worker to exit, then `check_stopped`."""
    worker.send_signal(signal.SIGTERM)
    code = await wait_exit(worker, STOP_TIMEOUT_S)
    async with Probe() as probe:
        left = {q: await probe.ready(q) for q in [peer.queue, *peer.side_queues]}
    check_stopped(peer, workdir, code, left, n)


async def idle_memory(peer: Peer, worker: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Read the idle worker tree's memory once it consumes and has settled."""
    async with Probe() as probe:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (found := await probe.depth(peer.queue)) is None or found[1] < peer.consumers:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the worker never consumed ({peer.consumers} consumers)")
            await asyncio.sleep(0.05)
    await asyncio.sleep(IDLE_S)
    readings: list[tuple[list[int], int, int]] = []
    deadline = time.monotonic() + STABLE_TIMEOUT_S
    stable = False
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise BenchError(f"the idle worker exited with status {worker.returncode}")
        pids = tree(worker.pid)
        try:
            reading = (pids, *memory_kib(pids))
        except OSError:  # a process of the tree ended meanwhile: read the new tree
            continue
        readings = [*readings[-(STABLE_READINGS - 1) :], reading]
        last = [pss for _, pss, _ in readings]
        stable = (
            len(readings) == STABLE_READINGS
            and all(r[0] == pids for r in readings)
            and max(last) - min(last) <= STABLE_SPREAD * max(last)
        )
        if stable:
            break
        await asyncio.sleep(0.5)
    if not readings:
        raise BenchError("the worker's memory could not be read")
    pids, pss, rss = readings[-1]
    worker.send_signal(signal.SIGTERM)
    code = await wait_exit(worker, STOP_TIMEOUT_S)
    if code != 0:
        raise BenchError(f"the idle worker exited with status {code} on SIGTERM")
    return {
        "mode": peer.mode,
        "pss_kib": pss,
        "rss_kib": rss,
        "processes": len(pids),
        "stable": stable,
    }


async def pool_probe(worker: subprocess.Popen[bytes], workdir: Path) -> dict[str, Any]:
    """Does the installed conveyor run the pool? It exits 0 on an empty queue if it does."""
    code = await wait_exit(worker, START_TIMEOUT_S)
    log = log_text(workdir)
    if code != 0 and "prefork" not in log:
        raise BenchError(f"conveyor's pool probe failed with status {code}:\n{log_tail(workdir)}")
    lines = [line.strip() for line in log.splitlines() if "prefork" in line]
    return {"mode": "probe", "accepted": code == 0, "message": lines[-1] if lines else ""}


async def delete(peer: Peer) -> None:
    async with Probe() as probe:
        await probe.delete([peer.queue, *peer.side_queues], peer.exchanges)


def measure(
    mode: str, measurement: str, n: int, pool: str, conveyor_args: Sequence[str] = ()
) -> dict[str, Any]:
    """One measurement of one peer, in this process; raises BenchError unless it checks out."""
    queue = f"bench-worker-{mode}-{uuid.uuid4().hex[:8]}"
    peer = make_peer(mode, queue, pool, measurement != "memory", conveyor_args)
    worker = None
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        workdir = Path(tmp)
        source = peer.source.format(url=URL, queue=queue) + ledger.TASK_SIDE
        (workdir / "bench_app.py").write_text(source)
        sys.path.insert(0, tmp)
        try:
            if measurement == "throughput":
                publish(mode, n)
                asyncio.run(wait_queued(queue, n))
                os.environ.update(ledger.fresh(workdir / "ledger"))  # the worker inherits it
            started = time.perf_counter()
            worker = start_worker(peer, workdir)
            if measurement == "throughput":
                result = asyncio.run(throughput(peer, worker, n, workdir, started))
                balance = ledger.verify(workdir / "ledger", n)
                if not balance.exact:
                    raise BenchError(f"{mode}, tasks not run exactly once: {balance.describe()}")
                return result
            if measurement == "memory":
                return asyncio.run(idle_memory(peer, worker))
            return asyncio.run(pool_probe(worker, workdir))
        finally:
            if worker is not None:
                kill_group(worker)
            asyncio.run(delete(peer))


async def wait_queued(queue: str, n: int) -> None:
    """Wait until the queue holds exactly n (a publisher without confirms may still be sending)."""
    async with Probe() as probe:
        deadline = time.monotonic() + 30
        while (queued := await probe.ready(queue)) != n:
            if queued > n or time.monotonic() > deadline:
                raise BenchError(f"expected {n} tasks in the queue before starting, found {queued}")
            await asyncio.sleep(0.05)


def run_one(args: argparse.Namespace) -> int:
    # SIGTERM from the harness (its timeout) unwinds through `finally`: no worker or queue left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = measure(
            args.one, args.measure, args.tasks, args.conveyor_pool, args.conveyor_arg or ()
        )
    except BenchError as exc:
        print(f"{args.one} ({args.measure}): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# The harness.


def spawn(mode: str, measurement: str, args: argparse.Namespace, pool: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON result."""
    command = [sys.executable, "-m", "bench.rabbitmq_worker", "--one", mode]
    command += ["--measure", measurement, "--tasks", str(args.tasks), "--conveyor-pool", pool]
    timeout = 2 * START_TIMEOUT_S + 3 * STOP_TIMEOUT_S + args.tasks / 10
    return one_result(command, f"{mode} ({measurement})", timeout)


def one_result(command: list[str], label: str, timeout: float) -> dict[str, Any]:
    """Run one measurement's command (`python -m ... --one ...`) in a fresh interpreter; the
    JSON result it printed last. A measurement that fails, hangs or prints none is a
    BenchError (a hung one gets SIGTERM first, so it cleans up after itself)."""
    one = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = one.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        one.terminate()
        try:
            one.communicate(timeout=STOP_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            one.kill()
            one.communicate()
        raise BenchError(f"{label} did not finish within {timeout:.0f}s") from None
    if one.returncode != 0:
        raise BenchError(err.decode(errors="replace").strip() or f"{label} failed")
    try:
        return dict(json.loads(out.decode().strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{label} printed no result: {out!r}") from None


def choose_pool(args: argparse.Namespace) -> tuple[str, str]:
    """The conveyor pool to measure, and a note for the report when it is not the one asked for."""
    if args.conveyor_pool != "prefork":
        return args.conveyor_pool, ""
    probe = spawn("conveyor", "probe", args, "prefork")
    if probe["accepted"]:
        return "prefork", ""
    message = probe["message"] or "refused"
    print(f"conveyor refuses the prefork pool ({message}); measuring threads instead")
    return "threads", (
        "**The installed conveyor refuses the prefork pool** "
        f"(`{message}`), so conveyor ran with `--pool threads`: one process with 2 threads. "
        "Rerun once prefork has landed."
    )


def chosen_modes(text: str) -> tuple[str, ...]:
    """The modes named by `--modes` (modes and groups, comma-separated), in the report's order."""
    wanted: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in MODES:
            wanted.add(name)
        elif name:
            known = ", ".join([*GROUPS, *MODES])
            raise argparse.ArgumentTypeError(f"unknown mode or group {name!r}; known: {known}")
    if not wanted:
        raise argparse.ArgumentTypeError("no mode chosen")
    return tuple(m for m in MODES if m in wanted)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the report uses medians")
    parser.add_argument(
        "--modes",
        type=chosen_modes,
        default=MODES,
        help="comma-separated modes or groups to measure (default all; quick: conveyor and the "
        f"probe; groups {', '.join(GROUPS)}; modes {', '.join(MODES)})",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure idle memory too (--no-memory: throughput only, for a shorter run)",
    )
    parser.add_argument(
        "--conveyor-pool",
        default="prefork",
        help="conveyor's --pool (default prefork; threads if the installed conveyor refuses it)",
    )
    parser.add_argument("--one", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--measure", choices=("throughput", "memory", "probe"), help=argparse.SUPPRESS
    )
    parser.add_argument("--conveyor-arg", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tasks < 100 or args.repeat < 1:
        parser.error("--tasks must be at least 100 and --repeat at least 1")
    if args.one:
        return run_one(args)
    modes: tuple[str, ...] = args.modes
    notes = []
    if PROBE in modes and not DISPATCH_PROBE.is_file():
        modes = tuple(m for m in modes if m != PROBE)
        notes.append(
            f"The parent-dispatch probe was not measured: `{DISPATCH_PROBE}` is not there (it "
            "lives beside the project, not in it), so the probe's row and the ratios to it are "
            "left out."
        )
        print(f"no {DISPATCH_PROBE}: the parent-dispatch probe is skipped")
    if not modes:
        parser.error("nothing left to measure")
    load = os.getloadavg()[0]
    try:
        server = asyncio.run(_server_version())
        pool, note = choose_pool(args) if set(modes) & set(VARIANTS) else (args.conveyor_pool, "")
        runs = run_rounds(args, pool, modes)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    write_report(args, pool, [*notes, *([note] if note else [])], server, runs, load)
    return 0


async def _server_version() -> str:
    async with Probe() as probe:
        return probe.server_version


# The parent-dispatch probe, a script of its own.

PROBE_QUEUE = "probe-parent-dispatch"
"""The probe's queue without priorities: deleted here only when a run of it fails."""


def dispatch_probe(n: int) -> dict[str, Any]:
    """One run of `parent_dispatch.py N 2 32` in a session of its own: its process/s.

    It fills its own queue, forks its parent and children, and prints one line; it is run with
    neither PRIO (no x-max-priority) nor UVLOOP (asyncio's loop) in its environment.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PRIO", "UVLOOP")}
    command = [sys.executable, str(DISPATCH_PROBE), str(n), str(SLOTS), str(PROBE_BATCH)]
    timeout = START_TIMEOUT_S + n / 100
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        probe = subprocess.Popen(
            command,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = probe.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(probe)
            asyncio.run(_delete_probe_queue())
            message = f"the parent-dispatch probe did not finish within {timeout:.0f}s"
            raise BenchError(message) from None
        finally:
            kill_group(probe)  # its forked processes, should any have outlived it
    text = out.decode(errors="replace").strip()
    found = PROBE_RATE.search(text)
    if probe.returncode != 0 or found is None:
        asyncio.run(_delete_probe_queue())
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-15:])
        raise BenchError(
            f"the parent-dispatch probe exited with status {probe.returncode} and printed "
            f"{text!r}:\n{tail}"
        )
    return {"mode": PROBE, "tasks": n, "per_s": float(found[1]), "printed": text}


async def _delete_probe_queue() -> None:
    async with Probe() as probe:
        await probe.delete([PROBE_QUEUE], [])


# Rounds and the report.

Runs = dict[str, dict[str, list[dict[str, Any]]]]


def run_rounds(args: argparse.Namespace, pool: str, modes: tuple[str, ...]) -> Runs:
    """Every round: each mode's throughput, then the idle memory of those measured for it; the
    order rotates by one each round."""
    memory = tuple(m for m in modes if m in MEMORY_MODES) if args.memory else ()
    runs: Runs = {"throughput": {m: [] for m in modes}, "memory": {m: [] for m in memory}}
    for round_no in range(args.repeat):
        for measurement, chosen in (("throughput", modes), ("memory", memory)):
            if not chosen:
                continue
            shift = round_no % len(chosen)
            for mode in chosen[shift:] + chosen[:shift]:
                if mode == PROBE:
                    result = dispatch_probe(args.tasks)
                else:
                    result = spawn(mode, measurement, args, pool)
                runs[measurement][mode].append(result)
                if measurement == "throughput":
                    figure = f"{result['per_s']:>8,.0f} tasks/s"
                else:
                    figure = f"PSS {result['pss_kib'] / 1024:>6.1f} MiB"
                print(
                    f"round {round_no + 1}/{args.repeat}  {measurement:<10} {mode:<16} {figure}",
                    flush=True,
                )
    return runs


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


@dataclass
class Figures:
    """The medians of one run's rounds, and what they are compared with."""

    runs: Runs
    rate: dict[str, float]
    startup: dict[str, float]
    cpu: dict[str, float]
    """CPU µs per task of the parent: conveyor's and Celery's (the one holding the connection)."""
    broker_cpu: dict[str, float]
    """CPU µs per task of the RabbitMQ server, when it runs on this machine."""
    pss: dict[str, float]
    rss: dict[str, float]
    label: dict[str, str]
    best: str | None
    """The faster Dramatiq, if one ran."""
    lean: str | None
    """The Dramatiq whose idle tree is smaller, if one was measured."""

    @classmethod
    def of(cls, runs: Runs) -> Figures:
        modes, memory = list(runs["throughput"]), list(runs["memory"])
        rate = {m: median(runs["throughput"][m], "per_s") for m in modes}
        pss = {m: median(runs["memory"][m], "pss_kib") / 1024 for m in memory}
        dramatiq = [m for m in ("dramatiq-t1", "dramatiq-t8") if m in rate]
        lean = [m for m in ("dramatiq-t1", "dramatiq-t8") if m in pss]
        label = dict(LABELS)
        if "conveyor" in rate:
            loops = ", ".join(sorted({str(r.get("loop")) for r in runs["throughput"]["conveyor"]}))
            label["conveyor"] = f"conveyor, defaults (loop auto: {loops}; no x-max-priority)"
        return cls(
            runs=runs,
            rate=rate,
            startup={m: median(runs["throughput"][m], "startup_s") for m in modes if m != PROBE},
            cpu={
                m: median(runs["throughput"][m], "parent_cpu_us")
                for m in modes
                if (m in VARIANTS or m == "celery")
                and all("parent_cpu_us" in r for r in runs["throughput"][m])
            },
            broker_cpu={
                m: median(runs["throughput"][m], "broker_cpu_us")
                for m in modes
                if all("broker_cpu_us" in r for r in runs["throughput"][m])
            },
            pss=pss,
            rss={m: median(runs["memory"][m], "rss_kib") / 1024 for m in memory},
            label=label,
            best=max(dramatiq, key=rate.__getitem__) if dramatiq else None,
            lean=min(lean, key=pss.__getitem__) if lean else None,
        )

    @property
    def references(self) -> dict[str, str | None]:
        """What every row is divided by: Dramatiq's best, Celery, the probe (None: not run)."""
        return {
            "Dramatiq (best)": self.best,
            "Celery": "celery" if "celery" in self.rate else None,
            "probe": PROBE if PROBE in self.rate else None,
        }

    def ratios(self) -> dict[str, dict[str, float | None]]:
        return {
            m: {
                name: None if to is None else self.rate[m] / self.rate[to]
                for name, to in self.references.items()
            }
            for m in self.rate
        }

    def loops(self) -> dict[str, list[str]]:
        """The loops conveyor's workers said they ran on, per mode."""
        throughput = self.runs["throughput"]
        return {
            m: sorted({str(r.get("loop")) for r in throughput[m]})
            for m in throughput
            if m in VARIANTS
        }


def blank_or(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def throughput_lines(f: Figures) -> list[str]:
    references = f.references
    best = f.label[f.best] if f.best else "not measured"
    lines = [
        "## Processing throughput",
        "",
        "2 slots per worker, late acks, no results stored. Timed from the first delivery until",
        "no message is left ready in the queue, polled every 5 ms (start-up is not timed); the",
        "probe times its own children. Ratios are of medians: this row's tasks/s over",
        f"Dramatiq's best ({best}), Celery's and the probe's; `-` where that one did not run.",
        "CPU per task: of the worker's process that holds the broker connection, and of the",
        "RabbitMQ server, in the timed window.",
        "",
        f"| Worker | tasks/s | {' | '.join(f'÷ {name}' for name in references)} "
        "| parent CPU per task (µs) | RabbitMQ CPU per task (µs) | start to first delivery (s) |",
        "|---|---:|" + "---:|" * len(references) + "---:|---:|---:|",
    ]
    ratios = f.ratios()
    for m, rate in f.rate.items():
        cells = " | ".join(blank_or(ratios[m][name], ".2f") for name in references)
        cpu, broker = blank_or(f.cpu.get(m), ".0f"), blank_or(f.broker_cpu.get(m), ".0f")
        start = blank_or(f.startup.get(m), ".2f")
        lines.append(f"| {f.label[m]} | {rate:,.0f} | {cells} | {cpu} | {broker} | {start} |")
    return [*lines, ""]


VARIANT_PAIRS = (
    ("conveyor-uvloop", "conveyor-asyncio", "the worker's loop: uvloop ÷ asyncio"),
    ("conveyor-asyncio", "conveyor-p9", "no x-max-priority (the default) ÷ 9, on asyncio"),
    ("conveyor-p3", "conveyor-p9", "x-max-priority 3 ÷ 9, on asyncio"),
    ("conveyor-p5", "conveyor-p9", "x-max-priority 5 ÷ 9, on asyncio"),
)


def variant_lines(f: Figures) -> list[str]:
    """The loop against the loop, and each x-max-priority against 9, all from the same run.

    Beside the ratio of medians, each round's own ratio (its two runs were at most one round
    apart, so a change of the machine's load between rounds mostly cancels out) and their
    median; and the CPU per task of the parent and of RabbitMQ, this variant's over the other's
    (medians).
    """
    throughput = f.runs["throughput"]
    rows = []
    for mode, base, what in VARIANT_PAIRS:
        if mode not in throughput or base not in throughput:
            continue
        rounds = [
            a["per_s"] / b["per_s"] for a, b in zip(throughput[mode], throughput[base], strict=True)
        ]
        cpu, broker = (
            None if mode not in d or base not in d else d[mode] / d[base]
            for d in (f.cpu, f.broker_cpu)
        )
        rows.append(
            f"| {what} | {f.rate[mode]:,.0f} ÷ {f.rate[base]:,.0f} | "
            f"{f.rate[mode] / f.rate[base]:.2f}x | {statistics.median(rounds):.2f}x | "
            f"{', '.join(f'{r:.2f}' for r in rounds)} | {blank_or(cpu, '.2f')} | "
            f"{blank_or(broker, '.2f')} |"
        )
    if not rows:
        return []
    return [
        "## conveyor's variants against each other",
        "",
        "| Variant | tasks/s (medians) | ratio of medians | median of rounds' ratios | "
        "each round's ratio | parent CPU per task, ratio | RabbitMQ CPU per task, ratio |",
        "|---|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
    ]


def memory_lines(f: Figures) -> list[str]:
    if not f.pss:
        return []
    lines = [
        "## Idle memory of the worker process tree",
        "",
        "Started, consuming its empty queue, idle; the worker process and all its descendants.",
        "",
        "| Worker | processes | PSS (MiB) | RSS (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for m, runs in f.runs["memory"].items():
        lines.append(
            f"| {f.label[m]} | {runs[-1]['processes']} | {f.pss[m]:.1f} | {f.rss[m]:.1f} |"
        )
    lines.append("")
    unstable = sorted({m for m, runs in f.runs["memory"].items() for r in runs if not r["stable"]})
    if unstable:
        lines += [
            f"Memory never settled within {STABLE_TIMEOUT_S:.0f}s for: {', '.join(unstable)} "
            "(the last reading is used).",
            "",
        ]
    return lines


def target_lines(f: Figures) -> list[str]:
    """conveyor's defaults against the targets of issue 16 and the memory target."""
    lines = ["## Targets", ""]
    if "conveyor" not in f.rate:
        return [*lines, "conveyor with its defaults was not measured in this run.", ""]
    lines += [f"For {f.label['conveyor']}:", ""]
    celery = "celery" if "celery" in f.rate else None
    for peer, target, which in (
        (f.best, DRAMATIQ_TARGET, ", the faster"),
        (celery, CELERY_TARGET, ""),
    ):
        if peer is None:
            lines.append(
                f"- Throughput against a peer this run did not measure (target {target:g}x)."
            )
            continue
        value = f.rate["conveyor"] / f.rate[peer]
        verdict = "met" if value >= target else "not met"
        lines.append(
            f"- Throughput, conveyor ÷ {f.label[peer]}{which}: {value:.2f}x; "
            f"target at least {target:g}x: {verdict}."
        )
    if f.lean is not None and "conveyor" in f.pss:
        value = f.pss["conveyor"] / f.pss[f.lean]
        verdict = "met" if value <= MEMORY_TARGET else "not met"
        celery_pss = f.pss.get("celery")
        against = (
            ""
            if celery_pss is None
            else f"; PSS against Celery: {f.pss['conveyor'] / celery_pss:.2f}x"
        )
        lines.append(
            f"- Idle memory (PSS), conveyor ÷ {f.label[f.lean]}, the smaller: {value:.2f}x; "
            f"target at most {MEMORY_TARGET:g}x: {verdict}. "
            f"(RSS: {f.rss['conveyor'] / f.rss[f.lean]:.2f}x{against}.)"
        )
    return [*lines, ""]


def all_runs_lines(f: Figures) -> list[str]:
    lines = [
        "## All runs",
        "",
        "| Worker | tasks/s | parent CPU per task (µs) | RabbitMQ CPU per task (µs) | PSS (MiB) "
        "| RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for m, runs in f.runs["throughput"].items():
        memory = f.runs["memory"].get(m, [])
        rates = ", ".join(f"{r['per_s']:,.0f}" for r in runs)
        cpus = ", ".join(f"{r['parent_cpu_us']:.0f}" for r in runs) if m in f.cpu else "-"
        broker = ", ".join(f"{r['broker_cpu_us']:.0f}" for r in runs) if m in f.broker_cpu else "-"
        psss = ", ".join(f"{r['pss_kib'] / 1024:.1f}" for r in memory) or "-"
        rsss = ", ".join(f"{r['rss_kib'] / 1024:.1f}" for r in memory) or "-"
        lines.append(f"| {f.label[m]} | {rates} | {cpus} | {broker} | {psss} | {rsss} |")
    return lines


def write_report(
    args: argparse.Namespace, pool: str, notes: list[str], server: str, runs: Runs, load: float
) -> None:
    import platform
    from importlib.metadata import version

    from bench.__main__ import cpu_model

    names = ("conveyor", "dramatiq", "celery", "kombu", "amqp", "billiard", "pika", "aiormq")
    versions = ", ".join(f"{name} {version(name)}" for name in (*names, "uvloop"))
    f = Figures.of(runs)
    left_out = [m for m in MODES if m not in f.rate]
    lines = [
        "# Benchmarks: workers on RabbitMQ",
        "",
        "Written by `python -m bench.rabbitmq_worker` (`make bench`); rerun it rather than",
        "editing the figures. The method is at the end.",
        "",
        f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC against the local RabbitMQ "
        f"{server}, {args.tasks:,} no-op tasks per throughput run, medians of {args.repeat}",
        f"round{'s' if args.repeat > 1 else ''}, modes alternating (the order rotates each "
        f"round), each run in its own process on fresh queues; conveyor with `--pool {pool}`.",
        f"Versions: {versions}; Python {platform.python_version()}.",
        f"Machine: `nproc` {len(os.sched_getaffinity(0))}, {cpu_model()}; 1-minute load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        "",
    ]
    if left_out:
        lines += [f"Not measured in this run: {', '.join(f'`{m}`' for m in left_out)}.", ""]
    for note in notes:
        lines += [note, ""]
    lines += [*throughput_lines(f), *variant_lines(f), *memory_lines(f), *target_lines(f)]
    method = (__doc__ or "").splitlines()[2:]
    lines += ["## Method", "", *method, "", *all_runs_lines(f)]
    REPORT.write_text("\n".join(lines) + "\n")
    from bench import data

    data.save(
        "worker",
        {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "command": "python -m bench.rabbitmq_worker " + " ".join(sys.argv[1:]),
            "server": server,
            "versions": versions,
            "tasks": args.tasks,
            "repeat": args.repeat,
            "pool": pool,
            "modes": list(f.rate),
            "notes": notes,
            "labels": {m: f.label[m] for m in f.rate},
            "loops": f.loops(),
            "rate": f.rate,
            "ratios": f.ratios(),
            "startup_s": f.startup,
            "parent_cpu_us": f.cpu,
            "broker_cpu_us": f.broker_cpu,
            "pss_mib": f.pss,
            "rss_mib": f.rss,
            "best_dramatiq": f.best,
            "lean_dramatiq": f.lean,
            "targets": {
                "dramatiq": DRAMATIQ_TARGET,
                "celery": CELERY_TARGET,
                "memory": MEMORY_TARGET,
            },
            "runs": runs,
        },
    )
    print("\n".join(lines[lines.index("## Processing throughput") : lines.index("## Method")]))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    sys.exit(main())
