"""Latency on RabbitMQ: conveyor against Dramatiq and Celery, one task at a time to an idle worker.

`python -m bench.latency` (part of `make bench`) measures, for single tasks sent one at a time,
how long a task waits before it starts (**enqueue-to-start**) and how long until the sender's
`get()` has its result (**enqueue-to-result**), p50 and p99. Report in docs/benchmarks-latency.md,
figures in docs/bench-data/latency.json: medians over `--repeat` rounds, peers alternating (the
order rotates each round). Every run is a process of its own (`--one MODE`), which writes the
peer's app module into a temporary directory, uses a queue with a fresh unique name and a unique
Redis key prefix, starts the worker from its own command line in a new process group, and
whatever happens kills what is left of that group and deletes the queues and the Redis keys.

Every peer uses the local RabbitMQ as its broker and the local Redis for results; the workers
are started exactly as in `bench.rabbitmq_worker` (2 slots, late acks):

- conveyor: `conveyor worker bench_app:app --pool prefork -c 2`, the task declared with
  `@app.task(acks_late=True)`, results in `redis://127.0.0.1:6379/0?prefix=P` (its `get()` is
  woken by pub/sub);
- Dramatiq: `dramatiq bench_app -p 2 -t 1`, and `-t 8`, `RabbitmqBroker` with the default
  middleware plus `Results` on a `RedisBackend` with a unique namespace, the actor declared with
  `store_results=True`; its `message.get_result(block=True)` waits on a blocking list pop;
- Celery: `celery -A bench_app worker -P prefork -c 2 -l WARNING --without-gossip
  --without-mingle --without-heartbeat`, `task_acks_late=True`, the default prefetch multiplier,
  its Redis result backend with a unique `global_keyprefix` (its `get()` waits on pub/sub).

The task is the same for every peer: it reads `time.time()` first, notes its number in the
exactly-once ledger (`bench.ledger`), and returns the time it read. The client, with the peer's
own API in the measuring process, reads `time.time()` right before it sends a task (conveyor
`delay(n)`, Dramatiq `send(n)`, Celery `apply_async((n,))`) and again when that task's `get()`
has returned. Worker and client share the machine's clock, so

- enqueue-to-start = the task's start time - the send time;
- enqueue-to-result = the time `get()` returned - the send time.

Start-up is not measured. Once the worker consumes its queue (a passive `queue.declare` sees
all its consumers), the client sends a task, waits for its result, then pauses a fixed gap
(`--gap-ms`, 20 ms by default) so the worker is idle again, and sends the next: one task in
flight, never a queue. The gap is part of the method: it is not timed and does not wait for
anything. The first 20 tasks are warm-ups, untimed, so both ends have their connections open;
then N (`--tasks`, 300 by default) are timed. p50 and p99 are nearest-rank percentiles of one
run's N samples; the report gives the median of each over the rounds.

Every run is verified. Each result must be the start time of the task sent (a float between
that send and its `get()`), within 60 s. Then the worker gets SIGTERM (a warm shutdown) and must
exit with status 0; its queue and dead-letter and retry queues must be empty; its log must hold
no error or traceback; conveyor's closing line must count exactly the tasks sent as succeeded
and nothing failed, retried or dead-lettered; and the ledger must show every task sent, warm-ups
included, run exactly once. Anything else fails the run and no report is written.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import data, ledger
from bench.rabbitmq_worker import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    URL,
    BenchError,
    Peer,
    Probe,
    kill_group,
    make_peer,
    one_result,
    start_worker,
    stop_and_check,
)
from bench.results_roundtrip import delete_keys, percentile, wait_consuming

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks-latency.md"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 0
MODES = ("conveyor", "dramatiq-t1", "dramatiq-t8", "celery")
DRAMATIQ = ("dramatiq-t1", "dramatiq-t8")
LABELS = {
    "conveyor": "conveyor, `--pool prefork`",
    "dramatiq-t1": "Dramatiq, 1 thread each",
    "dramatiq-t8": "Dramatiq, 8 threads each",
    "celery": "Celery",
}
TARGET = 1.0
"""conveyor's enqueue-to-start p50 at most this multiple of Dramatiq's (the lower of its two)."""
WARMUP = 20
GET_TIMEOUT_S = 60.0
RESULT_EXPIRES_S = 3600
FIGURES = ("start_p50_ms", "start_p99_ms", "result_p50_ms", "result_p99_ms")

TASK = """

@{decorator}
def stamp(n: int) -> float:
    started = time.time()
    record(n)
    return started
"""
CONVEYOR_APP = """\
import time

from conveyor import Conveyor

app = Conveyor(
    "bench",
    broker={url!r},
    results={results!r},
    default_queue={queue!r},
    result_expires={expires},
)
"""
DRAMATIQ_APP = """\
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

broker = RabbitmqBroker(url={url!r})
broker.add_middleware(
    Results(
        backend=RedisBackend(
            url={results!r}, namespace={prefix!r}, use_namespace_prefix_keys=True
        ),
        result_ttl={expires} * 1000,
    )
)
dramatiq.set_broker(broker)
"""
CELERY_APP = """\
import time

from celery import Celery

app = Celery("bench", broker={url!r}, backend={results!r})
app.conf.update(
    task_default_queue={queue!r},
    task_acks_late=True,
    result_expires={expires},
    result_backend_transport_options={{"global_keyprefix": {prefix!r}}},
    broker_connection_retry_on_startup=True,
)
"""
DECORATORS = {
    "conveyor": 'app.task(name="bench.stamp", acks_late=True)',
    "dramatiq": 'dramatiq.actor(queue_name={queue!r}, actor_name="bench_stamp", '
    "store_results=True, max_retries=0)",
    "celery": 'app.task(name="bench.stamp", acks_late=True)',
}


def app_source(mode: str, queue: str, prefix: str) -> str:
    """The peer's app module: its broker and result store, the ledger, and the `stamp` task."""
    family = mode.split("-", maxsplit=1)[0]
    template = {"conveyor": CONVEYOR_APP, "dramatiq": DRAMATIQ_APP, "celery": CELERY_APP}[family]
    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    results = f"{redis_url}?prefix={prefix}" if family == "conveyor" else redis_url
    values = {
        "url": URL,
        "queue": queue,
        "results": results,
        "prefix": f"{prefix}:" if family == "celery" else prefix,
        "expires": RESULT_EXPIRES_S,
    }
    decorator = DECORATORS[family].format(**values)
    # TASK_SIDE holds braces of its own, so it is appended rather than formatted.
    return template.format(**values) + ledger.TASK_SIDE + TASK.format(decorator=decorator)


# The client's side, in the measuring process.


class Client:
    """Sends `stamp(n)` and waits for its result, with the peer's own API."""

    def __init__(self, mode: str) -> None:
        self.module: Any = importlib.import_module("bench_app")
        self.family = mode.split("-", maxsplit=1)[0]

    def send(self, n: int) -> Any:
        if self.family == "dramatiq":
            return self.module.stamp.send(n)
        if self.family == "celery":
            return self.module.stamp.apply_async((n,))
        return self.module.stamp.delay(n)

    def get(self, handle: Any, n: int) -> Any:
        try:
            if self.family == "dramatiq":
                return handle.get_result(block=True, timeout=int(GET_TIMEOUT_S * 1000))
            return handle.get(timeout=GET_TIMEOUT_S)
        except Exception as exc:  # the peers' timeouts and failures alike
            raise BenchError(f"no result for stamp({n}): {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self.family == "dramatiq":
            self.module.broker.close()
        else:
            self.module.app.close()


def one_by_one(client: Client, first: int, n: int, gap_s: float) -> list[tuple[float, float]]:
    """n tasks, each sent once the previous result is back and `gap_s` has passed.

    (enqueue-to-start, enqueue-to-result) in seconds for each.
    """
    samples = []
    for i in range(first, first + n):
        sent = time.time()
        handle = client.send(i)
        started = client.get(handle, i)
        got = time.time()
        if not isinstance(started, float) or not sent <= started <= got:
            raise BenchError(f"stamp({i}) returned {started!r}, not a time in [{sent}, {got}]")
        samples.append((started - sent, got - sent))
        time.sleep(gap_s)
    return samples


def summarize(samples: list[tuple[float, float]]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of both latencies, in milliseconds."""
    start = [s for s, _ in samples]
    result = [r for _, r in samples]
    return {
        "start_p50_ms": round(percentile(start, 50) * 1000, 3),
        "start_p99_ms": round(percentile(start, 99) * 1000, 3),
        "start_max_ms": round(max(start) * 1000, 3),
        "result_p50_ms": round(percentile(result, 50) * 1000, 3),
        "result_p99_ms": round(percentile(result, 99) * 1000, 3),
        "result_max_ms": round(max(result) * 1000, 3),
    }


# One peer's run, in its own process.


async def stop_and_verify(
    peer: Peer, worker: subprocess.Popen[bytes], workdir: Path, sent: int
) -> None:
    """Warm shutdown, then nothing left over, nothing wrong in the log, every task run once."""
    await stop_and_check(peer, worker, workdir, sent)
    balance = ledger.verify(workdir / "ledger", sent)
    if not balance.exact:
        raise BenchError(f"the ledger does not balance: {balance.describe()}")


def measure(mode: str, n: int, gap_s: float) -> dict[str, Any]:
    """One peer's run, in this process; raises BenchError unless every check passes."""
    token = uuid.uuid4().hex[:10]
    queue = f"bench-latency-{mode}-{token}"
    prefix = f"bench-latency-{token}"
    peer = make_peer(mode, queue, "prefork", until_empty=False)
    peer = dataclasses.replace(peer, source=app_source(mode, queue, prefix))
    worker = None
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_app.py").write_text(peer.source)
        sys.path.insert(0, tmp)
        # start_worker passes this process's environment on: the ledger's directory with it.
        os.environ.update(ledger.fresh(workdir / "ledger"))
        try:
            started = time.perf_counter()
            worker = start_worker(peer, workdir)
            asyncio.run(wait_consuming(peer, worker, workdir))
            startup = time.perf_counter() - started
            client = Client(mode)
            try:
                one_by_one(client, 0, WARMUP, gap_s)
                samples = one_by_one(client, WARMUP, n, gap_s)
            finally:
                client.close()
            asyncio.run(stop_and_verify(peer, worker, workdir, WARMUP + n))
        finally:
            try:
                if worker is not None:
                    kill_group(worker)
                asyncio.run(delete_queues(peer))
            finally:
                delete_keys(REDIS_DB, prefix)
    return {"mode": mode, "tasks": n, "startup_s": round(startup, 3), **summarize(samples)}


async def delete_queues(peer: Peer) -> None:
    async with Probe() as probe:
        await probe.delete([peer.queue, *peer.side_queues], peer.exchanges)


def run_one(args: argparse.Namespace) -> int:
    # SIGTERM from the harness (its timeout) unwinds through `finally`: nothing is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = measure(args.one, args.tasks, args.gap_ms / 1000)
    except BenchError as exc:
        print(f"{args.one}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# The harness.


def spawn(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One peer's run in a fresh interpreter; its JSON result."""
    command = [sys.executable, "-m", "bench.latency", "--one", mode]
    command += ["--tasks", str(args.tasks), "--gap-ms", str(args.gap_ms)]
    timeout = START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + (WARMUP + args.tasks) * 0.5
    return one_result(command, mode, timeout)


Runs = dict[str, list[dict[str, Any]]]


def run_rounds(args: argparse.Namespace) -> Runs:
    runs: Runs = {m: [] for m in MODES}
    for round_no in range(args.repeat):
        order = MODES[round_no % len(MODES) :] + MODES[: round_no % len(MODES)]
        for mode in order:
            result = spawn(mode, args)
            runs[mode].append(result)
            print(
                f"round {round_no + 1}/{args.repeat}  {mode:<12} to start p50 "
                f"{result['start_p50_ms']:6.2f} ms p99 {result['start_p99_ms']:7.2f} ms   "
                f"to result p50 {result['result_p50_ms']:6.2f} ms p99 "
                f"{result['result_p99_ms']:7.2f} ms",
                flush=True,
            )
    return runs


def server_versions() -> dict[str, str]:
    """RabbitMQ's and Redis's versions; BenchError if one is not reachable."""
    import redis

    async def rabbitmq() -> str:
        async with Probe() as probe:
            return probe.server_version

    versions = {"RabbitMQ": asyncio.run(rabbitmq())}
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        versions["Redis"] = str(client.info("server")["redis_version"])
    except redis.RedisError as exc:
        raise BenchError(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}") from None
    finally:
        client.close()
    return versions


def medians(runs: Runs) -> dict[str, dict[str, float]]:
    return {m: {f: float(statistics.median(r[f] for r in runs[m])) for f in FIGURES} for m in MODES}


def write_report(
    args: argparse.Namespace, servers: dict[str, str], runs: Runs, load: float
) -> None:
    import platform
    from importlib.metadata import version

    from bench.__main__ import cpu_model

    names = ("conveyor", "dramatiq", "celery", "kombu", "pika", "aiormq", "redis", "hiredis")
    versions = {name: version(name) for name in names}
    mid = medians(runs)
    best = min(DRAMATIQ, key=lambda m: mid[m]["start_p50_ms"])
    ratio = {
        peer: {f: round(mid["conveyor"][f] / mid[peer][f], 3) for f in FIGURES}
        for peer in (best, "celery")
    }
    target_ratio = ratio[best]["start_p50_ms"]
    met = target_ratio <= TARGET
    now = dt.datetime.now(dt.UTC)
    command = "python -m bench.latency " + shlex.join(sys.argv[1:])
    load_end = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    rounds = f"{args.repeat} round{'s' if args.repeat > 1 else ''}"

    lines = [
        "# Benchmarks: latency of single tasks on RabbitMQ",
        "",
        "Written by `python -m bench.latency` (`make bench`); rerun it rather than",
        "editing the figures. The method is at the end.",
        "",
        f"Run on {now:%Y-%m-%d %H:%M} UTC (`{command.strip()}`) against the local RabbitMQ "
        f"{servers['RabbitMQ']} (broker) and Redis {servers['Redis']} (results), "
        f"{args.tasks:,} timed tasks per run one at a time after {WARMUP} warm-ups, "
        f"{args.gap_ms:g} ms apart, medians of {rounds}, peers alternating (the order rotates "
        "each round), each run in its own process with a fresh queue and key prefix.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; "
        f"Python {platform.python_version()}.",
        f"Machine: `nproc` {cores}, {cpu_model()}; 1-minute load average {load:.2f} at the "
        f"start, {load_end:.2f} at the end.",
        "",
        "## Enqueue-to-start and enqueue-to-result",
        "",
        "Milliseconds, one task in flight, the worker idle when each is sent (2 slots, late acks).",
        "",
        "| Worker | to start p50 | to start p99 | to result p50 | to result p99 |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {LABELS[m]} | " + " | ".join(f"{mid[m][f]:.2f}" for f in FIGURES) + " |"
            for m in MODES
        ),
        "",
        "Ratios, conveyor ÷ the peer (below 1 is faster):",
        "",
        "| conveyor ÷ | to start p50 | to start p99 | to result p50 | to result p99 |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {LABELS[p]}"
            + (", the lower to-start p50" if p == best else "")
            + " | "
            + " | ".join(f"{ratio[p][f]:.2f}x" for f in FIGURES)
            + " |"
            for p in ratio
        ),
        "",
        "## Target",
        "",
        f"- Enqueue-to-start p50, conveyor ÷ {LABELS[best]}: {target_ratio:.2f}x; target at "
        f"most {TARGET:g}x (no higher than Dramatiq's): {'met' if met else 'not met'}.",
        "",
        "## Method",
        "",
        *(__doc__ or "").splitlines()[2:],
        "",
        "## All runs",
        "",
        "Milliseconds, one figure per round in the order run.",
        "",
        "| Worker | to start p50 | to start p99 | to result p50 | to result p99 |",
        "|---|---|---|---|---|",
    ]
    for m in MODES:
        cells = [", ".join(f"{r[f]:.2f}" for r in runs[m]) for f in FIGURES]
        lines.append(f"| {LABELS[m]} | {' | '.join(cells)} |")
    REPORT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[lines.index("## Enqueue-to-start and enqueue-to-result") :][:22]))
    print(f"wrote {REPORT}")

    data.save(
        "latency",
        {
            "date": now.isoformat(timespec="minutes"),
            "command": command.strip(),
            "machine": {
                "nproc": cores,
                "cpu": cpu_model(),
                "python": platform.python_version(),
                "load_1min_start": round(load, 2),
                "load_1min_end": round(load_end, 2),
            },
            "servers": servers,
            "versions": versions,
            "tasks": args.tasks,
            "warmup": WARMUP,
            "gap_ms": args.gap_ms,
            "repeat": args.repeat,
            "labels": LABELS,
            "figures": list(FIGURES),
            "median": mid,
            "ratio": ratio,
            "target": {
                "figure": "start_p50_ms",
                "against": best,
                "at_most": TARGET,
                "ratio": target_ratio,
                "met": met,
            },
            "runs": runs,
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300, help="timed tasks per run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the report uses medians")
    parser.add_argument(
        "--gap-ms", type=float, default=20.0, help="pause after each result (default 20)"
    )
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tasks < 10 or args.repeat < 1 or args.gap_ms < 0:
        parser.error("--tasks must be at least 10, --repeat at least 1, --gap-ms not negative")
    if args.one:
        return run_one(args)
    load = os.getloadavg()[0]
    try:
        servers = server_versions()
        runs = run_rounds(args)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    write_report(args, servers, runs, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
