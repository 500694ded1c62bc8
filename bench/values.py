"""What keeping values exact costs: the checks on a send and on a run, in microseconds.

Since values either arrive exactly or are refused (`conveyor.values`), every send checks its
arguments and every run checks its return value, and annotated arguments are converted by
msgspec in the worker. This times, in one interpreter, each step with and without that work:

- a send of `add(x, y)` with two ints (`Task.envelope`, then `encode`), with the check a send
  made before (`Signature.bind`) and with today's (`conveyor.values.check_arguments`);
- a run's arguments and result for the same task: the job, `Signature.bind` and a plain encode
  of the result, as before, against the job, `Job.arguments()` and `encode_result`;
- the same run for a task whose one argument and return value are a dataclass of 15 fields
  (datetimes, a UUID, a Decimal, bytes, a set, a tuple, a dict with int keys, enums, a nested
  dataclass and a msgspec Struct).

Each figure is the median of `--repeat` runs of `--number` calls (time.perf_counter_ns). The
per-task cost of a whole task is taken from the saved figures of the `worker` and `embedded`
scenarios when they exist, to say what share of a task the checks are.

    python -m bench.values [--number 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import decimal
import enum
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

import conveyor.task as task_module
from bench import data
from conveyor import Conveyor
from conveyor.brokers import Delivery
from conveyor.message import encode
from conveyor.values import check_arguments, encode_result
from conveyor.worker.execution import Job

REPORT = data.ROOT / "docs" / "benchmarks-values.md"


class Mood(enum.Enum):
    CALM = "calm"


@dataclasses.dataclass
class Inner:
    x: int
    at: dt.datetime


class Tag(msgspec.Struct):
    name: str


@dataclasses.dataclass
class Rich:
    when: dt.datetime
    day: dt.date
    span: dt.timedelta
    ident: uuid.UUID
    amount: decimal.Decimal
    raw: bytes
    tags: set[str]
    pair: tuple[int, str]
    by_id: dict[int, str]
    mood: Mood
    inner: Inner
    tag: Tag
    count: int
    ratio: float
    note: str


RICH = Rich(
    dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    dt.date(2026, 1, 2),
    dt.timedelta(seconds=5),
    uuid.UUID(int=7),
    decimal.Decimal("10.50"),
    b"0123456789",
    {"a", "b"},
    (1, "one"),
    {1: "a", 2: "b"},
    Mood.CALM,
    Inner(3, dt.datetime(2026, 1, 1)),
    Tag("t"),
    42,
    0.5,
    "note",
)


def per_call_us(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Median microseconds per call over `repeat` runs of `number` calls."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter_ns() - started) / number / 1000)
    return statistics.median(runs)


def measure(number: int, repeat: int) -> dict[str, float]:
    app = Conveyor("bench-values", broker="memory://", results=None)

    @app.task(name="bench.add")
    def add(x, y):  # type: ignore[no-untyped-def]
        return x + y

    @app.task(name="bench.rich")
    def rich(value: Rich) -> Rich:
        return value

    plain_encoder = msgspec.json.Encoder()
    envelope = add.envelope((2, 3))
    body = encode(envelope)
    rich_envelope = rich.envelope((RICH,))
    rich_body = encode(rich_envelope)
    delivery = Delivery("default", body, None)

    def old_check(types: Any, args: Any, kwargs: Any) -> None:
        types.signature.bind(*args, **kwargs)  # all a send checked before

    def send_before() -> None:
        with_old_check(lambda: encode(add.envelope((2, 3))))

    def send_now() -> None:
        encode(add.envelope((2, 3)))

    def run_before() -> None:
        Job(delivery, envelope, add)
        add.signature.bind(*envelope.args, **envelope.kwargs)
        plain_encoder.encode(5)

    def run_now() -> None:
        Job(delivery, envelope, add).arguments()
        encode_result(5, add.types)

    def rich_send() -> None:
        encode(rich.envelope((RICH,)))

    def rich_run() -> None:
        Job(Delivery("default", rich_body, None), rich_envelope, rich).arguments()
        encode_result(RICH, rich.types)

    def with_old_check(fn: Callable[[], Any]) -> None:
        task_module.check_arguments = old_check
        try:
            fn()
        finally:
            task_module.check_arguments = check_arguments

    figures = {
        name: per_call_us(fn, number if "rich" not in name else max(number // 10, 100), repeat)
        for name, fn in (
            ("send_before_us", send_before),
            ("send_now_us", send_now),
            ("run_before_us", run_before),
            ("run_now_us", run_now),
            ("rich_send_us", rich_send),
            ("rich_run_us", rich_run),
        )
    }
    app.close()
    return figures


def task_cost_us() -> dict[str, float]:
    """Microseconds per task of whole runs, from the saved figures of other scenarios."""
    costs: dict[str, float] = {}
    worker = data.load("worker")
    rate = (worker or {}).get("rate", {}).get("conveyor")
    if rate:
        costs["RabbitMQ worker, prefork, 2 processes"] = 1e6 / rate
    embedded = data.load("embedded")
    if embedded:
        for v in embedded.get("variants", {}).values():
            rate = v.get("median", {}).get("conveyor", {}).get("process_per_s")
            if rate:
                costs[f"embedded, {v['label']}"] = 1e6 / rate
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    f = measure(args.number, args.repeat)
    added_send = f["send_now_us"] - f["send_before_us"]
    added_run = f["run_now_us"] - f["run_before_us"]
    costs = task_cost_us()
    lines = [
        "# Benchmark: what keeping values exact costs",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        "| Step | Before | Now | Added |",
        "|---|---:|---:|---:|",
        f"| a send of `add(2, 3)` | {f['send_before_us']:.2f} µs | {f['send_now_us']:.2f} µs "
        f"| {added_send:+.2f} µs |",
        f"| a run of `add(2, 3)`: arguments and result | {f['run_before_us']:.2f} µs "
        f"| {f['run_now_us']:.2f} µs | {added_run:+.2f} µs |",
        f"| a send of a 15-field annotated dataclass | | {f['rich_send_us']:.1f} µs | |",
        f"| a run of it: conversion and result | | {f['rich_run_us']:.1f} µs | |",
        "",
    ]
    if costs:
        lines += ["Against a whole task (from the latest saved figures of other scenarios):", ""]
        change = added_send + added_run
        lines += [
            f"- {where}: {cost:.0f} µs per task (one send and one run); the checks "
            + (f"add {change / cost:.1%}" if change > 0 else f"save {-change / cost:.1%}")
            for where, cost in costs.items()
        ]
        lines.append("")
    lines += [
        f"Measured with `python -m bench.values --number {args.number} "
        f"--repeat {args.repeat}` (medians).",
        "",
    ]
    REPORT.write_text("\n".join(lines), encoding="utf-8")
    data.save(
        "values",
        {
            **f,
            "task_cost_us": costs,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "command": f"python -m bench.values --number {args.number} --repeat {args.repeat}",
            "versions": {"msgspec": msgspec.__version__},
        },
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
