"""What metrics and tracing cost a worker: the same drain with and without them, same run.

`python -m bench.metrics_cost [--broker rabbitmq|sqlite] [--tasks N] [--rounds R]` runs an
in-process prefork worker of 4 children draining N no-op tasks (`ignore_results`), in three
variants per round, in an order that rotates by round so a drift in the machine's load favours
none:

- off: no middleware;
- metrics: `PrometheusMiddleware` (what `--metrics-port` adds), no endpoint scraped;
- tracing: `TracingMiddleware` with the API's no-op provider (the spans' own cost is the SDK's
  and its exporter's, which the application chooses).

It prints, per variant, the median rate (tasks/s) and the median CPU time the worker's own
process spent per task (µs): the worker's process is what bounds a prefork worker's rate, and
its CPU time is the steadier figure on a machine shared with other work. Each run must have run
every task once. Then an estimate from the hot path itself: what metrics add per settlement in
the worker's process (making the `Settled`, and the middleware's counting), timed in-process, as
a share of the worker's CPU per task without them. Not part of `make bench`: it writes no report;
docs/metrics.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import statistics
import time
import timeit
import uuid
from collections.abc import Sequence

from conveyor import Conveyor, Worker
from conveyor.middleware.otel import TracingMiddleware
from conveyor.middleware.prometheus import PrometheusMiddleware

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
VARIANTS = ("off", "metrics", "tracing")
CHILDREN = 4
BATCH = 1000


def middleware(variant: str) -> list[object]:
    if variant == "metrics":
        return [PrometheusMiddleware()]
    if variant == "tracing":
        return [TracingMiddleware()]
    return []


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only: not the children
    return usage.ru_utime + usage.ru_stime


def one_run(broker: str, variant: str, tasks: int, directory: str) -> tuple[float, float]:
    """(tasks per second, µs of this process's CPU per task) for one drain."""
    queue = f"bench-metrics-{uuid.uuid4().hex[:8]}"
    url = AMQP_URL if broker == "rabbitmq" else f"sqlite:///{directory}/{queue}.db"
    app = Conveyor(
        "bench",
        broker=url,
        results=None,
        ignore_results=True,
        default_queue=queue,
        middleware=middleware(variant),
    )
    try:

        @app.task(name="noop")
        def noop() -> None: ...

        for _ in range(0, tasks, BATCH):
            noop.map([() for _ in range(BATCH)])
        worker = Worker(
            app, pool="prefork", concurrency=CHILDREN, until_empty=True, task_log="quiet"
        )
        cpu, began = cpu_seconds(), time.perf_counter()
        stats = worker.run()
        elapsed, cpu = time.perf_counter() - began, cpu_seconds() - cpu
        if stats.succeeded != tasks or stats.failed or stats.received != tasks:
            raise SystemExit(f"{variant}: the run did not run every task once: {stats}")
    finally:
        app.close()
        if broker == "rabbitmq":
            asyncio.run(_delete(queue))
    return tasks / elapsed, cpu / tasks * 1e6


async def _delete(queue: str) -> None:
    import aiormq

    from conveyor.brokers.rabbitmq import BUCKETS_MS

    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel()
    for name in (queue, f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)):
        await channel.queue_delete(name)
    await connection.close()


def hot_path_us() -> float:
    """µs the worker's process spends per settlement on metrics: the `Settled` it makes for
    `after_settle` and the middleware's counting, timed in-process (best of 5: the machine's
    other load only ever adds)."""
    from conveyor.brokers import Delivery
    from conveyor.message import Envelope
    from conveyor.middleware.base import Settled
    from conveyor.testing import memory_app

    app = memory_app()
    try:

        @app.task(name="noop")
        def noop() -> None: ...

        metrics = PrometheusMiddleware()
        envelope = Envelope(id="0" * 32, task="noop", queue="q", sent_at=time.time())
        delivery = Delivery("q", b"", None, 1)
        now = time.time()

        def settle() -> None:
            metrics.after_settle(
                Settled(
                    outcome="succeeded",
                    queue=delivery.queue,
                    envelope=envelope,
                    task=noop,
                    took=0.0001,
                    started_at=now,
                )
            )

        n = 100_000
        return min(timeit.timeit(settle, number=n) for _ in range(5)) / n * 1e6
    finally:
        app.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=("rabbitmq", "sqlite"), default="rabbitmq")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp", help="where SQLite brokers' files go")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    costs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for n in range(args.rounds):
        order = VARIANTS[n % 3 :] + VARIANTS[: n % 3]
        for variant in order:
            rate, cost = one_run(args.broker, variant, args.tasks, args.dir)
            rates[variant].append(rate)
            costs[variant].append(cost)
            print(f"round {n + 1} {variant:8} {rate:8,.0f} tasks/s {cost:6.1f} µs/task", flush=True)
    base_rate, base_cost = statistics.median(rates["off"]), statistics.median(costs["off"])
    hot = hot_path_us()
    print(f"\n{args.broker}, prefork x{CHILDREN}, {args.tasks:,} no-op tasks, {args.rounds} rounds")
    print("variant   rate (median)  vs off   worker CPU/task (median)  vs off")
    for variant in VARIANTS:
        rate, cost = statistics.median(rates[variant]), statistics.median(costs[variant])
        print(
            f"{variant:8} {rate:10,.0f}/s {rate / base_rate:8.2f} {cost:18.1f} µs "
            f"{cost / base_cost:10.2f}"
        )
    print(
        f"metrics on the hot path: {hot:.2f} µs per settlement, "
        f"{hot / base_cost:.1%} of the worker's CPU per task without them"
    )


if __name__ == "__main__":
    main()
