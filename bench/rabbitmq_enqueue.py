"""Bulk enqueue to RabbitMQ: conveyor against Dramatiq and Celery on the same server, same run.

`python -m bench.rabbitmq_enqueue` (part of `make bench`) sends N no-op tasks from one producer
with each peer, in its own subprocess, into a fresh queue on the local RabbitMQ, and measures
tasks per second from the first send to the last one returning:

- conveyor: `Task.map()`, persistent, mandatory, with publisher confirms (its only mode);
- Dramatiq: `actor.send()` per task, without confirms (its default) and with `confirm_delivery`;
- Celery: `apply_async()` per task, with kombu's `confirm_publish` and without.

Every run then checks that the queue holds exactly N messages, and the queues are deleted. The
report (medians over rounds, alternating peers) goes to docs/benchmarks-rabbitmq.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

URL = "amqp://guest:guest@127.0.0.1:5672/"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-rabbitmq.md"
MODES = ("conveyor", "dramatiq", "dramatiq-confirms", "celery-confirms", "celery")
TARGETS = (("dramatiq", 1.0), ("celery-confirms", 5.0))


def count_and_delete(queues: list[str], expected: int) -> int:
    """Messages waiting in `queues` (ready ones), which are then deleted.

    A peer publishing without confirms returns before RabbitMQ has taken in its last messages:
    the count is read again until it reaches `expected` or stops changing for 2 s (so a run
    that lost messages is still refused, just not before they had every chance to arrive).
    """
    import aiormq

    async def count(connection: aiormq.abc.AbstractConnection) -> int:
        total = 0
        channel = await connection.channel()
        for name in queues:
            try:
                ok = await channel.queue_declare(name, passive=True)
                total += int(ok.message_count or 0)
            except aiormq.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()  # a missing queue closes the channel
        await channel.close()
        return total

    async def run() -> int:
        connection = await aiormq.connect(URL)
        total, same_since = -1, time.monotonic()
        while True:
            now = await count(connection)
            if now != total:
                total, same_since = now, time.monotonic()
            if total >= expected or time.monotonic() - same_since > 2.0:
                break
            await asyncio.sleep(0.05)
        channel = await connection.channel()
        for name in queues:
            try:
                await channel.queue_delete(name)
            except aiormq.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
        await connection.close()
        return total

    return asyncio.run(run())


def run_conveyor(queue: str, n: int) -> tuple[float, list[str]]:
    from conveyor import Conveyor
    from conveyor.brokers.rabbitmq import BUCKETS_MS

    app = Conveyor("bench", broker=URL, results=None, default_queue=queue)
    noop = app.task(name="bench.noop")(lambda: None)
    app.broker.publish([])  # connect before the clock starts, as the peers do
    noop.delay()  # declares the queue; counted below
    started = time.perf_counter()
    noop.map([() for _ in range(n - 1)])
    elapsed = time.perf_counter() - started
    app.close()
    return elapsed, [queue, f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)]


def run_dramatiq(queue: str, n: int, confirms: bool) -> tuple[float, list[str]]:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=URL, confirm_delivery=confirms)
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=queue, actor_name="bench_noop")
    def noop() -> None:
        pass

    noop.send()  # declares the queue; counted below
    started = time.perf_counter()
    for _ in range(n - 1):
        noop.send()
    elapsed = time.perf_counter() - started
    broker.close()
    return elapsed, [queue, f"{queue}.DQ", f"{queue}.XQ"]


def run_celery(queue: str, n: int, confirms: bool) -> tuple[float, list[str]]:
    from celery import Celery

    app = Celery("bench", broker=URL)
    app.conf.task_default_queue = queue
    app.conf.broker_transport_options = {"confirm_publish": confirms}

    @app.task(name="bench.noop")
    def noop() -> None:
        pass

    noop.apply_async()  # declares the queue; counted below
    started = time.perf_counter()
    for _ in range(n - 1):
        noop.apply_async()
    elapsed = time.perf_counter() - started
    return elapsed, [queue]


def measure(mode: str, n: int) -> dict[str, object]:
    """One run of one mode in this process; refuses a run that did not enqueue exactly n."""
    queue = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
    if mode == "conveyor":
        elapsed, queues = run_conveyor(queue, n)
    elif mode.startswith("dramatiq"):
        elapsed, queues = run_dramatiq(queue, n, confirms=mode.endswith("confirms"))
    else:
        elapsed, queues = run_celery(queue, n, confirms=mode.endswith("confirms"))
    found = count_and_delete(queues, n)
    if found != n:
        raise RuntimeError(f"{mode}: expected {n} messages in the queue, found {found}")
    return {"mode": mode, "tasks": n, "per_s": round((n - 1) / elapsed, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tasks)), flush=True)
        return 0
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_number in range(args.repeat):
        for mode in MODES:
            command = [sys.executable, "-m", "bench.rabbitmq_enqueue", "--one", mode]
            out = subprocess.run(
                [*command, "--tasks", str(args.tasks)], capture_output=True, text=True, check=True
            )
            rate = float(json.loads(out.stdout.strip().splitlines()[-1])["per_s"])
            rates[mode].append(rate)
            print(f"round {round_number + 1}/{args.repeat}  {mode:<18} {rate:>10,.0f}/s")
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    write_report(args, medians, rates)
    return 0


def write_report(
    args: argparse.Namespace, medians: dict[str, float], rates: dict[str, list[float]]
) -> None:
    from importlib.metadata import version

    versions = ", ".join(
        f"{name} {version(name)}" for name in ("conveyor", "dramatiq", "celery", "kombu", "pika")
    )
    lines = [
        "# Benchmarks: bulk enqueue to RabbitMQ",
        "",
        "Written by `python -m bench.rabbitmq_enqueue` (`make bench`); rerun it rather than",
        "editing the figures.",
        "",
        f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC against the local RabbitMQ, "
        f"{args.tasks:,} no-op tasks per run,",
        f"medians of {args.repeat} rounds, peers alternating, each run in its own process.",
        f"Versions: {versions}.",
        "",
        "| Producer | tasks/s |",
        "|---|---:|",
        *(f"| {mode} | {medians[mode]:,.0f} |" for mode in MODES),
        "",
        "conveyor publishes every message persistent and mandatory, and `map()` returns once",
        "RabbitMQ confirmed all of them. Dramatiq and Celery send one task per call.",
        "",
        "## Targets",
        "",
    ]
    for peer, target in TARGETS:
        ratio = medians["conveyor"] / medians[peer]
        verdict = "met" if ratio >= target else "not met"
        lines.append(
            f"- conveyor (confirms) against {peer}: {ratio:.2f}x, target {target:g}x: {verdict}."
        )
    lines += ["", "## All runs (tasks/s)", "", "| Producer | runs |", "|---|---|"]
    lines += [f"| {mode} | {', '.join(f'{r:,.0f}' for r in rates[mode])} |" for mode in MODES]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")
    from bench import data

    data.save(
        "enqueue",
        {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "command": "python -m bench.rabbitmq_enqueue " + " ".join(sys.argv[1:]),
            "versions": versions,
            "tasks": args.tasks,
            "repeat": args.repeat,
            "rate": medians,
            "targets": dict(TARGETS),
            "runs": rates,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
