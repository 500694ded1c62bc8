"""Scaling on RabbitMQ: processing rate against concurrency, and a backlog of 1,000,000 tasks.

`python -m bench.scaling` (part of `make bench`) writes docs/benchmarks-scaling.md and its figures,
docs/bench-data/scaling.json. Every measurement runs in a process of its own (`--one MODE`),
which writes the peer's app module into a temporary directory, uses queues with a fresh unique
name, starts the worker from its own command line in a new process group, and kills what is left
of that group and deletes the queues whatever happens (the helpers of `bench.rabbitmq_worker`).

Every task is a no-op that writes its number to the exactly-once ledger (`bench.ledger`), the same
code pasted into every peer's app module; a run whose ledger does not show each task exactly once
is refused, and so is one that fails any check of `bench.rabbitmq_worker`: the worker must exit
with status 0 (conveyor by itself, `--until-empty`, counting N succeeded and nothing failed,
retried or dead-lettered; Dramatiq and Celery on SIGTERM once the queue stayed empty for a
second), nothing may be left in the queue or the peer's dead-letter and retry queues, and the
worker's log may hold no error or traceback.

**Part A, rate against concurrency.** For K = 1, 2, 4 and 8, each peer's worker with K slots and
late acks, storing no results, drains a queue of N no-op tasks (`--tasks`, 10,000 by default):

- conveyor: `conveyor worker bench_app:app --pool prefork -c K --until-empty`, the task declared
  with `@app.task(acks_late=True)` on `Conveyor(..., ignore_results=True)`; its prefetch grows to
  K x 32 once its children run short tasks;
- Dramatiq: `dramatiq bench_app -p K -t 1` (K processes of one thread), `RabbitmqBroker` with the
  default middleware; late acks are its default, its prefetch 2 per thread;
- Celery: `celery -A bench_app worker -P prefork -c K -l WARNING --without-gossip
  --without-mingle --without-heartbeat` with a unique node name, `task_acks_late=True`, no result
  backend, the default prefetch multiplier (4 per slot).

Timed as in `bench.rabbitmq_worker`: the peer's own client fills the queue (conveyor `map()`,
Dramatiq `send()`, Celery `apply_async()`), which must hold exactly N before the worker starts;
then a passive `queue.declare` every 5 ms, the clock running from the first poll that sees fewer
than N ready to the first that sees none. The last prefetch window is still being run then and
is not timed: at most K x 32 tasks for conveyor, 2K for Dramatiq, 4K for Celery (at K = 8, 2.6%,
0.2% and 0.3% of the default N). Medians over `--repeat` rounds; in each round every K runs each
peer once, the peers' order rotating.

**Part B, a backlog (conveyor only).** conveyor's `map()` fills one queue with B no-op tasks
(`--backlog`, 1,000,000 by default) in chunks of 10,000, each chunk returning once RabbitMQ
confirmed every message (conveyor always publishes persistent messages with confirms); the
enqueue is timed. Then `conveyor worker bench_app:app --pool prefork -c 2 --until-empty` drains
it, timed as in Part A, while once a second the bench reads the queue's ready count and the
memory of the worker's process tree (the process it started and all its descendants, found in
/proc): the sums of `Rss` and `Pss` in `/proc/<pid>/smaps_rollup`. The ledger then has to show
all B tasks exactly once. Dramatiq and Celery are not run on the backlog, to keep `make bench`
within its time: draining a million tasks takes minutes per peer.

The verdict "memory does not grow with the backlog" holds when the tree's peak RSS over the
whole drain is at most 1.2 x its RSS at the first reading after 5% of the backlog was drained,
and no reading between 5% and 95% drained is below 0.8 x that RSS. The first part catches memory
that grows as tasks run (a leak, results kept); the second catches memory that holds the
backlog itself (a worker fetching far ahead of its slots would hold most of the queue at 5% and
shrink as it drains). The readings before 5% cover start-up and the forking of the children.
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
    delete,
    kill_group,
    memory_kib,
    one_result,
    start_worker,
    throughput,
    tree,
    wait_queued,
)

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks-scaling.md"
PEERS = ("conveyor", "dramatiq", "celery")
LABELS = {"conveyor": "conveyor", "dramatiq": "Dramatiq", "celery": "Celery"}
CONCURRENCY = (1, 2, 4, 8)
BACKLOG_SLOTS = 2
CHUNK = 10_000
"""Tasks per `map()` call when filling a queue."""
SAMPLE_S = 1.0
BASE_AT = 0.05
"""The drained share whose memory reading is the baseline of the verdict."""
CHECKPOINTS = (0.05, 0.10, 0.50, 0.90)
GROWTH = 1.2
"""The peak tree RSS may be at most this multiple of the baseline."""
SHRINK = 0.8
"""No reading between 5% and 95% drained may be below this multiple of the baseline."""
LAST_CHECKED = 0.95

CONVEYOR_APP = """\
from conveyor import Conveyor
{ledger}

app = Conveyor("bench", broker={url!r}, default_queue={queue!r}, ignore_results=True)


@app.task(name="bench.noop", acks_late=True)
def noop(n: int) -> None:
    record(n)
"""
DRAMATIQ_APP = """\
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
{ledger}

dramatiq.set_broker(RabbitmqBroker(url={url!r}))


@dramatiq.actor(queue_name={queue!r}, actor_name="bench_noop")
def noop(n: int) -> None:
    record(n)
"""
CELERY_APP = """\
from celery import Celery
{ledger}

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


def make_peer(mode: str, queue: str, slots: int) -> Peer:
    """The worker command, app module and broker objects for `mode` with `slots` slots."""
    bin_dir = Path(sys.executable).parent  # the bench venv's own console scripts
    if mode == "conveyor":
        from conveyor.brokers.rabbitmq import BUCKETS_MS

        command = [str(bin_dir / "conveyor"), "worker", "bench_app:app", "--pool", "prefork"]
        command += ["-c", str(slots), "--until-empty"]
        side = [f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)]
        return Peer(mode, queue, CONVEYOR_APP, command, side, [], 1)
    if mode == "dramatiq":
        command = [str(bin_dir / "dramatiq"), "bench_app", "-p", str(slots), "-t", "1"]
        return Peer(mode, queue, DRAMATIQ_APP, command, [f"{queue}.DQ", f"{queue}.XQ"], [], slots)
    if mode == "celery":
        command = [str(bin_dir / "celery"), "-A", "bench_app", "worker", "-P", "prefork"]
        command += ["-c", str(slots), "-l", "WARNING", "-n", f"{queue}@%h", "-Q", queue]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        return Peer(mode, queue, CELERY_APP, command, [], [queue], 1)
    raise ValueError(f"unknown mode {mode!r}")


# One measurement, in its own process.


def publish(mode: str, n: int) -> float:
    """Tasks 0..n-1 with the peer's own client, from the app module the worker imports; seconds."""
    app_module: Any = importlib.import_module("bench_app")
    started = time.perf_counter()
    if mode == "conveyor":
        for low in range(0, n, CHUNK):
            app_module.noop.map([(i,) for i in range(low, min(n, low + CHUNK))])
        elapsed = time.perf_counter() - started
        app_module.app.close()
    elif mode == "dramatiq":
        for i in range(n):
            app_module.noop.send(i)
        elapsed = time.perf_counter() - started
        app_module.dramatiq.get_broker().close()
    else:
        for i in range(n):
            app_module.noop.apply_async((i,))
        elapsed = time.perf_counter() - started
        app_module.app.close()
    return elapsed


async def drain_sampled(
    peer: Peer, worker: subprocess.Popen[bytes], n: int, workdir: Path, started: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`throughput` (timed and verified), with the queue and the worker tree read every second."""
    samples: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def sample() -> None:
        async with Probe() as probe:
            while not done.is_set() and worker.poll() is None:
                ready = await probe.ready(peer.queue)
                at = time.perf_counter() - started
                pids = tree(worker.pid)
                with contextlib.suppress(OSError):  # a process ended meanwhile: skip this one
                    pss, rss = memory_kib(pids)
                    samples.append(
                        {
                            "t_s": round(at, 2),
                            "ready": ready,
                            "drained": round((n - ready) / n, 4),
                            "rss_kib": rss,
                            "pss_kib": pss,
                            "processes": len(pids),
                        }
                    )
                if ready == 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), SAMPLE_S)

    sampler = asyncio.create_task(sample())
    try:
        result = await throughput(peer, worker, n, workdir, started)
    finally:
        done.set()
        with contextlib.suppress(BenchError):
            await sampler
    return result, samples


def measure(mode: str, slots: int, n: int, backlog: bool) -> dict[str, Any]:
    """One drain of n tasks, in this process; raises BenchError unless it checks out."""
    queue = f"bench-scaling-{mode}-c{slots}-{uuid.uuid4().hex[:8]}"
    peer = make_peer(mode, queue, slots)
    worker = None
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workdir = Path(tmp)
        source = peer.source.format(url=URL, queue=queue, ledger=ledger.TASK_SIDE)
        (workdir / "bench_app.py").write_text(source)
        sys.path.insert(0, tmp)
        os.environ.update(ledger.fresh(workdir / "ledger"))  # the worker inherits it
        try:
            enqueue_s = publish(mode, n)
            asyncio.run(wait_queued(queue, n))
            started = time.perf_counter()
            worker = start_worker(peer, workdir)
            if backlog:
                result, samples = asyncio.run(drain_sampled(peer, worker, n, workdir, started))
                result["samples"] = samples
            else:
                result = asyncio.run(throughput(peer, worker, n, workdir, started))
        finally:
            if worker is not None:
                kill_group(worker)
            asyncio.run(delete(peer))
        balance = ledger.verify(workdir / "ledger", n)
        if not balance.exact:
            raise BenchError(f"the ledger does not balance: {balance.describe()}")
    return {**result, "concurrency": slots, "enqueue_s": round(enqueue_s, 3)}


def run_one(args: argparse.Namespace) -> int:
    # SIGTERM from the harness (its timeout) unwinds through `finally`: no worker or queue left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    backlog = args.one == "backlog"
    mode = "conveyor" if backlog else args.one
    n = args.backlog if backlog else args.tasks
    try:
        result = measure(mode, args.concurrency, n, backlog)
    except BenchError as exc:
        print(f"{args.one} (-c {args.concurrency}): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# The harness.


def spawn(one: str, slots: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON result."""
    command = [sys.executable, "-m", "bench.scaling", "--one", one, "--concurrency", str(slots)]
    command += ["--tasks", str(args.tasks), "--backlog", str(args.backlog)]
    n = args.backlog if one == "backlog" else args.tasks
    timeout = 2 * START_TIMEOUT_S + 3 * STOP_TIMEOUT_S + n / 200
    return one_result(command, f"{one} (-c {slots})", timeout)


Runs = dict[str, dict[int, list[dict[str, Any]]]]


def run_rounds(args: argparse.Namespace) -> Runs:
    """Part A: every round, every K, each peer once; the peers' order rotates every run."""
    runs: Runs = {p: {k: [] for k in CONCURRENCY} for p in PEERS}
    turn = 0
    for round_no in range(args.repeat):
        for slots in CONCURRENCY:
            order = PEERS[turn % len(PEERS) :] + PEERS[: turn % len(PEERS)]
            turn += 1
            for peer in order:
                result = spawn(peer, slots, args)
                runs[peer][slots].append(result)
                print(
                    f"round {round_no + 1}/{args.repeat}  -c {slots}  {peer:<9} "
                    f"{result['per_s']:>8,.0f} tasks/s",
                    flush=True,
                )
    return runs


def first_at(samples: list[dict[str, Any]], share: float) -> dict[str, Any] | None:
    """The first reading once `share` of the backlog was drained."""
    return next((s for s in samples if s["drained"] >= share), None)


def memory_verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The readings the report names, and the verdict (see the module docstring)."""
    base = first_at(samples, BASE_AT)
    if base is None:
        raise BenchError("no memory reading after 5% of the backlog drained: use a larger backlog")
    peak = max(samples, key=lambda s: s["rss_kib"])
    checked = [s for s in samples if BASE_AT <= s["drained"] <= LAST_CHECKED] or [base]
    low = min(checked, key=lambda s: s["rss_kib"])
    return {
        "at": {f"{round(p * 100)}%": first_at(samples, p) for p in CHECKPOINTS},
        "start": samples[0],
        "peak_rss": peak,
        "peak_pss": max(samples, key=lambda s: s["pss_kib"]),
        "lowest_checked": low,
        "growth": round(peak["rss_kib"] / base["rss_kib"], 3),
        "shrink": round(low["rss_kib"] / base["rss_kib"], 3),
        "flat": peak["rss_kib"] <= GROWTH * base["rss_kib"]
        and low["rss_kib"] >= SHRINK * base["rss_kib"],
        "rule": (
            f"peak tree RSS <= {GROWTH:g} x the RSS at {BASE_AT:.0%} drained, and no reading "
            f"from {BASE_AT:.0%} to {LAST_CHECKED:.0%} drained below {SHRINK:g} x it"
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="no-op tasks per Part A run")
    parser.add_argument("--repeat", type=int, default=2, help="Part A rounds; medians reported")
    parser.add_argument(
        "--backlog", type=int, default=1_000_000, help="tasks queued before the Part B drain"
    )
    parser.add_argument("--one", choices=(*PEERS, "backlog"), help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=BACKLOG_SLOTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tasks < 100 or args.repeat < 1 or args.backlog < 1000:
        parser.error("--tasks must be at least 100, --backlog 1000 and --repeat 1")
    if args.one:
        return run_one(args)
    load = os.getloadavg()[0]
    started = time.monotonic()
    try:
        server = asyncio.run(_server_version())
        runs = run_rounds(args)
        part_a_s = time.monotonic() - started
        print(f"backlog: {args.backlog:,} tasks, conveyor -c {BACKLOG_SLOTS}", flush=True)
        backlog = spawn("backlog", BACKLOG_SLOTS, args)
        verdict = memory_verdict(backlog["samples"])
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    durations = {"part_a_s": part_a_s, "part_b_s": time.monotonic() - started - part_a_s}
    write_report(args, server, runs, backlog, verdict, load, durations)
    return 0


async def _server_version() -> str:
    async with Probe() as probe:
        return probe.server_version


# The report.


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def write_report(
    args: argparse.Namespace,
    server: str,
    runs: Runs,
    backlog: dict[str, Any],
    verdict: dict[str, Any],
    load: float,
    durations: dict[str, float],
) -> None:
    import platform
    from importlib.metadata import version

    from bench.__main__ import cpu_model

    names = ("conveyor", "dramatiq", "celery", "kombu", "amqp", "billiard", "pika", "aiormq")
    versions = {name: version(name) for name in names}
    rate = {p: {k: median(runs[p][k], "per_s") for k in CONCURRENCY} for p in PEERS}
    ratio = {p: {k: rate["conveyor"][k] / rate[p][k] for k in CONCURRENCY} for p in PEERS[1:]}
    scaling = {p: {k: rate[p][k] / rate[p][1] for k in CONCURRENCY} for p in PEERS}
    n = args.backlog
    enqueue_s = backlog["enqueue_s"]
    drain_s = n / backlog["per_s"]
    cores = len(os.sched_getaffinity(0))
    cpu = cpu_model()
    now = dt.datetime.now(dt.UTC)
    command = " ".join(["python -m bench.scaling", *sys.argv[1:]])
    took = sum(durations.values())

    lines = [
        "# Benchmarks: scaling on RabbitMQ",
        "",
        "Written by `python -m bench.scaling` (`make bench`); rerun it rather than editing the",
        "figures. The method is at the end; the figures are in `docs/bench-data/scaling.json`.",
        "",
        f"Run on {now:%Y-%m-%d %H:%M} UTC against the local RabbitMQ {server} (`{command}`),",
        f"in {took / 60:.1f} min (Part A {durations['part_a_s'] / 60:.1f}, Part B "
        f"{durations['part_b_s'] / 60:.1f}).",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; Python {platform.python_version()}.",
        f"Machine: `nproc` {cores}, {cpu}; 1-minute load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end.",
        "",
        "## Part A: processing rate against concurrency",
        "",
        f"{args.tasks:,} no-op tasks per run, late acks, no results stored; medians of "
        f"{args.repeat} round{'s' if args.repeat > 1 else ''}, each run in its own process on "
        "fresh queues and checked exactly-once by the ledger. Concurrency K is conveyor's and "
        "Celery's `-c K` (prefork) and Dramatiq's `-p K -t 1`.",
        "",
        "| Concurrency | conveyor (tasks/s) | Dramatiq (tasks/s) | Celery (tasks/s) "
        "| conveyor ÷ Dramatiq | conveyor ÷ Celery |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {k} | {rate['conveyor'][k]:,.0f} | {rate['dramatiq'][k]:,.0f} "
            f"| {rate['celery'][k]:,.0f} | {ratio['dramatiq'][k]:.2f}x "
            f"| {ratio['celery'][k]:.2f}x |"
            for k in CONCURRENCY
        ),
        "",
        "Each peer's rate as a multiple of its own rate at concurrency 1 (the machine has "
        f"{cores} cores, so beyond {cores} more slots can only overlap broker round trips):",
        "",
        "| Concurrency | conveyor | Dramatiq | Celery |",
        "|---:|---:|---:|---:|",
        *(
            f"| {k} | " + " | ".join(f"{scaling[p][k]:.2f}x" for p in PEERS) + " |"
            for k in CONCURRENCY
        ),
        "",
        "## Part B: draining a backlog (conveyor only)",
        "",
        f"{n:,} no-op tasks queued, then `conveyor worker --pool prefork -c {BACKLOG_SLOTS} "
        "--until-empty`; the ledger showed every task run exactly once. Dramatiq and Celery",
        "were not run on the backlog, to keep `make bench` within its time.",
        "",
        f"- Enqueue (`map()` in chunks of {CHUNK:,}, publisher confirms): {enqueue_s:,.1f} s, "
        f"{n / enqueue_s:,.0f} tasks/s.",
        f"- Drain: {drain_s:,.1f} s, {backlog['per_s']:,.0f} tasks/s "
        f"(start to first delivery {backlog['startup_s']:.2f} s).",
        "",
        "Memory of the worker's process tree, read every second:",
        "",
        "| Reading | drained | at (s) | processes | RSS (MiB) | PSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [("first reading", verdict["start"])]
    rows += [(f"first after {name} drained", s) for name, s in verdict["at"].items() if s]
    rows += [("peak RSS", verdict["peak_rss"]), ("peak PSS", verdict["peak_pss"])]
    rows += [(f"lowest RSS, {BASE_AT:.0%} to {LAST_CHECKED:.0%}", verdict["lowest_checked"])]
    lines += [
        f"| {name} | {s['drained']:.1%} | {s['t_s']:.1f} | {s['processes']} "
        f"| {mib(s['rss_kib'])} | {mib(s['pss_kib'])} |"
        for name, s in rows
    ]
    outcome = "memory does not grow with the backlog" if verdict["flat"] else "memory grew"
    lines += [
        "",
        f"Verdict: **{outcome}**. Peak tree RSS {verdict['growth']:.2f}x the RSS after "
        f"{BASE_AT:.0%} drained, lowest reading from {BASE_AT:.0%} to {LAST_CHECKED:.0%} "
        f"{verdict['shrink']:.2f}x; the rule: {verdict['rule']}.",
    ]
    method = (__doc__ or "").splitlines()[2:]
    lines += ["", "## Method", "", *method, "", "## All Part A runs (tasks/s)", ""]
    lines += ["| Concurrency | conveyor | Dramatiq | Celery |", "|---:|---|---|---|"]
    for k in CONCURRENCY:
        cells = (", ".join(f"{r['per_s']:,.0f}" for r in runs[p][k]) for p in PEERS)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    REPORT.write_text("\n".join(lines) + "\n")

    data.save(
        "scaling",
        {
            "date": now.isoformat(timespec="minutes"),
            "command": command,
            "server": server,
            "versions": versions,
            "machine": {"nproc": cores, "cpu": cpu, "python": platform.python_version()},
            "load": {"start": load, "end": os.getloadavg()[0]},
            "duration_s": {k: round(v, 1) for k, v in durations.items()},
            "labels": LABELS,
            "concurrency": {
                "tasks": args.tasks,
                "repeat": args.repeat,
                "levels": list(CONCURRENCY),
                "rate": {p: {str(k): v for k, v in rate[p].items()} for p in PEERS},
                "ratio": {p: {str(k): v for k, v in ratio[p].items()} for p in ratio},
                "scaling": {p: {str(k): v for k, v in scaling[p].items()} for p in PEERS},
                "runs": {p: {str(k): v for k, v in runs[p].items()} for p in PEERS},
            },
            "backlog": {
                "tasks": n,
                "concurrency": BACKLOG_SLOTS,
                "enqueue_s": enqueue_s,
                "enqueue_per_s": n / enqueue_s,
                "drain_s": drain_s,
                "drain_per_s": backlog["per_s"],
                "startup_s": backlog["startup_s"],
                "verdict": verdict,
                "samples": backlog["samples"],
            },
        },
    )
    print("\n".join(lines[lines.index("## Part A: processing rate against concurrency") :]))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    sys.exit(main())
