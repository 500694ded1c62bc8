"""Result round trips: each conveyor result store against Celery's Redis backend, RabbitMQ broker.

`python -m bench.results_roundtrip` (part of `make bench`) measures round trips per second: the
client sends a task, a worker runs it and stores its result, the client's `get()` returns it.
Every peer uses the local RabbitMQ as its broker; the result goes to:

- conveyor with `redis://127.0.0.1:6379/DB?prefix=P` (pub/sub wakes the waiting `get()`);
- conveyor with `postgresql://postgres@127.0.0.1:5432/test?table=T` (LISTEN/NOTIFY wakes it);
- conveyor with `rpc://` (records sent back to the sending process over direct reply-to);
- conveyor with `sqlite:////tmp/.../results.db`, a file the worker and the client share;
- Celery with its Redis backend, `redis://127.0.0.1:6379/DB` (its `get()` waits on pub/sub too).

Report in docs/benchmarks-results.md (figures in docs/bench-data/results.json): medians
over `--repeat` rounds, peers alternating (the order rotates each round). Every run is a process
of its own (`--one MODE`), which writes the peer's app module into a temporary directory, uses a
queue with a fresh unique name and a unique Redis key prefix or PostgreSQL table, starts the
worker from its own command line in a new process group, and whatever happens kills what is left
of that group, deletes the queues, the Redis keys and the table.

The workers have 2 slots and late acks and run `echo(i)`, which returns its argument:

- conveyor: `conveyor worker bench_app:app --pool prefork -c 2`, the task declared with
  `@app.task(acks_late=True)`, results kept an hour;
- Celery: `celery -A bench_app worker -P prefork -c 2 -l WARNING --without-gossip
  --without-mingle --without-heartbeat`, `task_acks_late=True`, the default prefetch multiplier,
  the Redis backend with a unique `global_keyprefix`, results kept an hour.

conveyor's worker may store a STARTED record before the final one; Celery stores only the final
state (`task_track_started` is off by default). Both read results with their own `get()`, which
waits for a notification rather than polling (conveyor's SQLite store excepted, which polls the
file).

Start-up is not measured. Once the worker consumes its queue (a passive `queue.declare` sees a
consumer), the client makes 20 round trips at once and 5 one by one, untimed, so both ends have
their connections open. Then, with the peer's own client, in the same process as the warm-up:

1. **sequential**: N round trips (500 by default), one task in flight: `delay(i)` (Celery:
   `apply_async((i,))`), then `get()` on its result, the next task only after that. Reported:
   round trips per second over the whole series, and the median and 99th percentile of one
   round trip's latency, in milliseconds;
2. **concurrent**: N tasks (2,000 by default) sent at once, conveyor with one `map()`, Celery
   with `apply_async()` in a loop, then `get()` on each result in the order sent; round trips
   per second from the first send to the last result read.

Every result is checked: each `get()` must return the argument its task was sent with, within
60 s. Then the worker gets SIGTERM (a warm shutdown) and must exit with status 0, its queue and
(conveyor) dead-letter and delay queues must be empty, its log must hold no error or traceback,
and conveyor's closing line must count exactly the tasks sent as succeeded and nothing failed,
retried or dead-lettered. Anything else fails the run and no report is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.rabbitmq_worker import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    URL,
    BenchError,
    Peer,
    Probe,
    kill_group,
    log_tail,
    one_result,
    start_worker,
    stop_and_check,
)

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks-results.md"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MODES = ("conveyor-redis", "conveyor-postgresql", "conveyor-rpc", "conveyor-sqlite", "celery")
BASELINE = "celery"
LABELS = {
    "conveyor-redis": "conveyor, `redis://`",
    "conveyor-postgresql": "conveyor, `postgresql://`",
    "conveyor-rpc": "conveyor, `rpc://`",
    "conveyor-sqlite": "conveyor, `sqlite://` file",
    "celery": "Celery, Redis backend",
}
SLOTS = 2
WARMUP_AT_ONCE = 20
WARMUP_ONE_BY_ONE = 5
GET_TIMEOUT_S = 60.0
RESULT_EXPIRES_S = 3600

CONVEYOR_APP = """\
from conveyor import Conveyor

app = Conveyor(
    "bench",
    broker={url!r},
    results={results!r},
    default_queue={queue!r},
    result_expires={expires},
)


@app.task(name="bench.echo", acks_late=True)
def echo(i: int) -> int:
    return i
"""
CELERY_APP = """\
from celery import Celery

app = Celery("bench", broker={url!r}, backend={results!r})
app.conf.update(
    task_default_queue={queue!r},
    task_acks_late=True,
    result_expires={expires},
    result_backend_transport_options={{"global_keyprefix": {prefix!r}}},
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.echo", acks_late=True)
def echo(i: int) -> int:
    return i
"""


@dataclass(frozen=True)
class Store:
    """Where one run's results go, and how to remove every trace of them afterwards."""

    url: str
    prefix: str
    """The Redis key prefix (empty for other stores)."""
    cleanup: Callable[[], None]


def make_store(mode: str, token: str, workdir: Path, redis_db: int) -> Store:
    """The result store URL for `mode`, unique to this run."""
    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
    if mode == "conveyor-redis":
        prefix = f"bench-rt-{token}"
        return Store(f"{redis_url}?prefix={prefix}", prefix, lambda: delete_keys(redis_db, prefix))
    if mode == "celery":
        prefix = f"bench-rt-{token}:"
        return Store(redis_url, prefix, lambda: delete_keys(redis_db, prefix))
    if mode == "conveyor-postgresql":
        table = f"bench_rt_{token}"
        return Store(f"{POSTGRES_URL}?table={table}", "", lambda: drop_table(table))
    if mode == "conveyor-rpc":
        return Store("rpc://", "", lambda: None)
    if mode == "conveyor-sqlite":
        # Deleted with the temporary directory.
        return Store(f"sqlite:///{workdir / 'results.db'}", "", lambda: None)
    raise ValueError(f"unknown mode {mode!r}")


def make_peer(mode: str, queue: str, store: Store) -> Peer:
    """The worker command and broker objects for `mode` on `queue`."""
    bin_dir = Path(sys.executable).parent  # the bench venv's own console scripts
    values = {"url": URL, "queue": queue, "results": store.url, "expires": RESULT_EXPIRES_S}
    if mode == "celery":
        command = [str(bin_dir / "celery"), "-A", "bench_app", "worker", "-P", "prefork"]
        command += ["-c", str(SLOTS), "-l", "WARNING", "-n", f"{queue}@%h", "-Q", queue]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        source = CELERY_APP.format(**values, prefix=store.prefix)
        return Peer(mode, queue, source, command, [], [queue], 1)
    from conveyor.brokers.rabbitmq import BUCKETS_MS

    command = [str(bin_dir / "conveyor"), "worker", "bench_app:app", "--pool", "prefork"]
    command += ["-c", str(SLOTS)]
    side = [f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)]
    return Peer(mode, queue, CONVEYOR_APP.format(**values), command, side, [], 1)


def delete_keys(db: int, prefix: str) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(batch), 1000):
            client.delete(*batch[start : start + 1000])
    finally:
        client.close()


def drop_table(table: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


# The client's side, in the measuring process.


class Client:
    """Sends `echo(i)` and reads results back, with the peer's own API."""

    def __init__(self, mode: str) -> None:
        self.module: Any = importlib.import_module("bench_app")
        self.celery = mode == "celery"

    def send(self, i: int) -> Any:
        if self.celery:
            return self.module.echo.apply_async((i,))
        return self.module.echo.delay(i)

    def send_many(self, numbers: range) -> list[Any]:
        if self.celery:
            return [self.module.echo.apply_async((i,)) for i in numbers]
        return list(self.module.echo.map([(i,) for i in numbers]))

    def get(self, result: Any, expected: int) -> None:
        try:
            value = result.get(timeout=GET_TIMEOUT_S)
        except Exception as exc:  # the peers' timeouts and failures alike
            raise BenchError(
                f"no result for echo({expected}): {type(exc).__name__}: {exc}"
            ) from None
        if value != expected:
            raise BenchError(f"echo({expected}) returned {value!r}")

    def close(self) -> None:
        self.module.app.close()


def sequential(client: Client, first: int, n: int) -> dict[str, float]:
    """n round trips, one in flight."""
    latencies = []
    started = time.perf_counter()
    for i in range(first, first + n):
        sent = time.perf_counter()
        client.get(client.send(i), i)
        latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - started
    return {
        "tasks": n,
        "per_s": round(n / elapsed, 1),
        "median_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
    }


def concurrent(client: Client, first: int, n: int) -> dict[str, float]:
    """n tasks sent at once, then every result read."""
    numbers = range(first, first + n)
    started = time.perf_counter()
    results = client.send_many(numbers)
    for i, result in zip(numbers, results, strict=True):
        client.get(result, i)
    elapsed = time.perf_counter() - started
    return {"tasks": n, "per_s": round(n / elapsed, 1)}


def percentile(samples: list[float], p: int) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)]


async def wait_consuming(peer: Peer, worker: subprocess.Popen[bytes], workdir: Path) -> None:
    async with Probe() as probe:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (found := await probe.depth(peer.queue)) is None or found[1] < peer.consumers:
            if worker.poll() is not None:
                raise BenchError(f"the worker exited at start:\n{log_tail(workdir)}")
            if time.monotonic() > deadline:
                raise BenchError(f"the worker never consumed:\n{log_tail(workdir)}")
            await asyncio.sleep(0.02)


@contextlib.contextmanager
def cleaned(store: Store, peer: Peer) -> Iterator[None]:
    """Delete the run's queues and stored results whatever happens inside."""
    try:
        yield
    finally:
        try:
            asyncio.run(delete_queues(peer))
        finally:
            store.cleanup()


async def delete_queues(peer: Peer) -> None:
    async with Probe() as probe:
        await probe.delete([peer.queue, *peer.side_queues], peer.exchanges)


def measure(mode: str, n_sequential: int, n_concurrent: int, redis_db: int) -> dict[str, Any]:
    """One peer's run, in this process; raises BenchError unless every check passes."""
    token = uuid.uuid4().hex[:10]
    queue = f"bench-results-{mode}-{token}"
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        workdir = Path(tmp)
        store = make_store(mode, token, workdir, redis_db)
        peer = make_peer(mode, queue, store)
        (workdir / "bench_app.py").write_text(peer.source)
        sys.path.insert(0, tmp)
        worker = None
        with cleaned(store, peer):
            try:
                started = time.perf_counter()
                worker = start_worker(peer, workdir)
                asyncio.run(wait_consuming(peer, worker, workdir))
                startup = time.perf_counter() - started
                client = Client(mode)
                try:
                    concurrent(client, -WARMUP_AT_ONCE - WARMUP_ONE_BY_ONE, WARMUP_AT_ONCE)
                    sequential(client, -WARMUP_ONE_BY_ONE, WARMUP_ONE_BY_ONE)
                    one_by_one = sequential(client, 0, n_sequential)
                    at_once = concurrent(client, n_sequential, n_concurrent)
                finally:
                    client.close()
                sent = WARMUP_AT_ONCE + WARMUP_ONE_BY_ONE + n_sequential + n_concurrent
                asyncio.run(stop_and_check(peer, worker, workdir, sent))
            finally:
                if worker is not None:
                    kill_group(worker)
    return {
        "mode": mode,
        "startup_s": round(startup, 3),
        "sequential": one_by_one,
        "concurrent": at_once,
    }


def run_one(args: argparse.Namespace) -> int:
    # SIGTERM from the harness (its timeout) unwinds through `finally`: nothing is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = measure(args.one, args.sequential, args.concurrent, args.redis_db)
    except BenchError as exc:
        print(f"{args.one}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# The harness.


def spawn(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One peer's run in a fresh interpreter; its JSON result."""
    command = [sys.executable, "-m", "bench.results_roundtrip", "--one", mode]
    command += ["--sequential", str(args.sequential), "--concurrent", str(args.concurrent)]
    command += ["--redis-db", str(args.redis_db)]
    timeout = START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + (args.sequential + args.concurrent) / 10
    return one_result(command, mode, timeout)


Runs = dict[str, list[dict[str, Any]]]


def run_rounds(args: argparse.Namespace) -> Runs:
    runs: Runs = {m: [] for m in MODES}
    for round_no in range(args.repeat):
        order = MODES[round_no % len(MODES) :] + MODES[: round_no % len(MODES)]
        for mode in order:
            result = spawn(mode, args)
            runs[mode].append(result)
            seq, conc = result["sequential"], result["concurrent"]
            print(
                f"round {round_no + 1}/{args.repeat}  {mode:<20} sequential "
                f"{seq['per_s']:>7,.0f}/s (median {seq['median_ms']:.2f} ms, "
                f"p99 {seq['p99_ms']:.2f} ms)  concurrent {conc['per_s']:>7,.0f}/s",
                flush=True,
            )
    return runs


def server_versions(redis_db: int) -> dict[str, str]:
    """RabbitMQ, Redis and PostgreSQL versions; BenchError if one is not reachable."""
    import psycopg
    import redis

    async def rabbitmq() -> str:
        async with Probe() as probe:
            return probe.server_version

    versions = {"RabbitMQ": asyncio.run(rabbitmq())}
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
    try:
        versions["Redis"] = str(client.info("server")["redis_version"])
    except redis.RedisError as exc:
        raise BenchError(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}") from None
    finally:
        client.close()
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}") from None
    versions["PostgreSQL"] = str(row[0]).split()[0] if row else "?"
    return versions


def median(runs: list[dict[str, Any]], phase: str, key: str) -> float:
    return float(statistics.median(r[phase][key] for r in runs))


def write_report(
    args: argparse.Namespace, servers: dict[str, str], runs: Runs, load: float
) -> None:
    import platform
    from importlib.metadata import version

    from bench.__main__ import cpu_model

    names = ("conveyor", "celery", "kombu", "redis", "hiredis", "psycopg", "aiormq")
    versions = ", ".join(f"{name} {version(name)}" for name in names)
    seq = {m: median(runs[m], "sequential", "per_s") for m in MODES}
    mid = {m: median(runs[m], "sequential", "median_ms") for m in MODES}
    p99 = {m: median(runs[m], "sequential", "p99_ms") for m in MODES}
    conc = {m: median(runs[m], "concurrent", "per_s") for m in MODES}

    def ratio(figures: dict[str, float], m: str) -> str:
        return f"{figures[m] / figures[BASELINE]:.2f}x"

    rounds = f"{args.repeat} round{'s' if args.repeat > 1 else ''}"
    lines = [
        "# Benchmarks: result round trips",
        "",
        "Written by `python -m bench.results_roundtrip` (`make bench`); rerun it rather than",
        "editing the figures. The method is at the end.",
        "",
        f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Broker for every peer: the local "
        f"RabbitMQ {servers['RabbitMQ']}; result stores: the local Redis {servers['Redis']} and "
        f"PostgreSQL {servers['PostgreSQL']}, RabbitMQ itself (`rpc://`), a SQLite file in /tmp.",
        f"{args.sequential:,} sequential and {args.concurrent:,} concurrent round trips per run, "
        f"medians of {rounds}, peers alternating (the order rotates each round), each run in its "
        "own process with a fresh queue, key prefix or table.",
        f"Versions: {versions}; Python {platform.python_version()}.",
        f"Machine: `nproc` {len(os.sched_getaffinity(0))}, {cpu_model()}; 1-minute load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        "",
        "## Sequential: one task in flight",
        "",
        "Send, then `get()`, then the next. Ratios: round trips/s of the row ÷ Celery's.",
        "",
        "| Peer | round trips/s | median (ms) | p99 (ms) | ÷ Celery |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {LABELS[m]} | {seq[m]:,.0f} | {mid[m]:.2f} | {p99[m]:.2f} | {ratio(seq, m)} |"
            for m in MODES
        ),
        "",
        f"## Concurrent: {args.concurrent:,} sent at once, then every result read",
        "",
        "| Peer | round trips/s | ÷ Celery |",
        "|---|---:|---:|",
        *(f"| {LABELS[m]} | {conc[m]:,.0f} | {ratio(conc, m)} |" for m in MODES),
        "",
        "## Method",
        "",
        *(__doc__ or "").splitlines()[2:],
        "",
        "## All runs",
        "",
        "| Peer | sequential round trips/s | median (ms) | p99 (ms) | concurrent round trips/s |",
        "|---|---|---|---|---|",
    ]
    for m in MODES:
        cells = [
            ", ".join(f"{r['sequential']['per_s']:,.0f}" for r in runs[m]),
            ", ".join(f"{r['sequential']['median_ms']:.2f}" for r in runs[m]),
            ", ".join(f"{r['sequential']['p99_ms']:.2f}" for r in runs[m]),
            ", ".join(f"{r['concurrent']['per_s']:,.0f}" for r in runs[m]),
        ]
        lines.append(f"| {LABELS[m]} | {' | '.join(cells)} |")
    REPORT.write_text("\n".join(lines) + "\n")
    print(
        "\n".join(
            lines[lines.index("## Sequential: one task in flight") : lines.index("## Method")]
        )
    )
    print(f"wrote {REPORT}")

    from bench import data

    data.save(
        "results",
        {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "command": "python -m bench.results_roundtrip " + " ".join(sys.argv[1:]),
            "servers": servers,
            "versions": versions,
            "sequential_tasks": args.sequential,
            "concurrent_tasks": args.concurrent,
            "repeat": args.repeat,
            "labels": {m: LABELS[m] for m in MODES},
            "baseline": BASELINE,
            "sequential": {
                m: {"per_s": seq[m], "median_ms": mid[m], "p99_ms": p99[m]} for m in MODES
            },
            "concurrent": {m: {"per_s": conc[m]} for m in MODES},
            "runs": runs,
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sequential", type=int, default=500, help="round trips one by one per run"
    )
    parser.add_argument("--concurrent", type=int, default=2000, help="tasks sent at once per run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the report uses medians")
    parser.add_argument(
        "--redis-db", type=int, default=0, help="Redis database for both peers (default 0)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the figures, write no report"
    )
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sequential < 10 or args.concurrent < 10 or args.repeat < 1:
        parser.error("--sequential and --concurrent must be at least 10, --repeat at least 1")
    if args.one:
        return run_one(args)
    load = os.getloadavg()[0]
    try:
        servers = server_versions(args.redis_db)
        runs = run_rounds(args)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    if not args.no_write:
        write_report(args, servers, runs, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
