"""Chords on RabbitMQ: conveyor against Celery, a 10,000-member chord from send to callback.

`python -m bench.chord` (part of `make bench`) sends one chord of `--members` tasks (10,000 by
default) and times it from just before the send until the sender's `get()` on the chord has the
callback's result (**send-to-callback**), and how long the send itself took (**send**). Report in
docs/benchmarks-chord.md, figures in docs/bench-data/chord.json: medians over `--repeat` rounds,
the peers alternating (the order rotates each round). Every run is a process of its own
(`--one MODE`), which writes the peer's app module into a temporary directory, uses a queue with
a fresh unique name and a unique Redis key prefix, starts the worker from its own command line in
a new process group, and whatever happens kills what is left of that group and deletes the
queues and the Redis keys.

Both peers use the local RabbitMQ as their broker and the local Redis for results; the workers
are started exactly as in `bench.rabbitmq_worker` (2 slots, prefork, late acks):

- conveyor: `conveyor worker bench_app:app --pool prefork -c 2`, results (and the chord's join)
  in `redis://127.0.0.1:6379/0?prefix=P`; `chord([part.s(n) ...], gather.s()).apply_async()`;
- Celery: `celery -A bench_app worker -P prefork -c 2 ...`, `task_acks_late=True`, its Redis
  result backend (whose chord join is a counter in Redis) with a unique `global_keyprefix`;
  `chord(part.s(n) ... )(gather.s())`.

Celery's chord returns a handle whose `get()` checks every member for an error each time it
wakes: with 10,000 members that takes minutes after the callback has run. The bench waits on
`app.AsyncResult(id)` of the callback instead, which has no members to check, so the figure is
Celery's chord and not its client.

The member `part(n)` notes its number in the exactly-once ledger (`bench.ledger`) and returns
`n`; the callback `gather(values)` notes number N (one past the members) and returns the count
of values and whether they came in order. The worker is started and consuming, and the client
has imported the app module, before the clock starts; the send includes the client's first
connections to the broker and the result store, for both peers.

Every run is verified: the callback's result must say N values, in order; the worker gets SIGTERM
(a warm shutdown) and must exit 0; its queues must be empty; its log must hold no error or
traceback; conveyor's closing line must count exactly N + 1 tasks succeeded and nothing failed,
retried or dead-lettered; and the ledger must show every member and the callback run exactly
once. Anything else fails the run and no report is written.
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
    kill_group,
    make_peer,
    one_result,
    start_worker,
    stop_and_check,
)
from bench.results_roundtrip import delete_keys, wait_consuming

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks-chord.md"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 0
MODES = ("conveyor", "celery")
LABELS = {"conveyor": "conveyor", "celery": "Celery"}
TARGET = 3.0
"""Celery's send-to-callback time ÷ conveyor's: at least this."""
RESULT_EXPIRES_S = 3600
FIGURES = ("send_s", "callback_s")

TASKS = """

@{decorator}
def part(n: int) -> int:
    record(n)
    return n


@{decorator}
def gather(values: list) -> list:
    record(len(values))
    return [len(values), int(values == list(range(len(values))))]
"""
CONVEYOR_APP = """\
from conveyor import Conveyor

app = Conveyor(
    "bench",
    broker={url!r},
    results={results!r},
    default_queue={queue!r},
    result_expires={expires},
)
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
"""
DECORATORS = {"conveyor": "app.task(acks_late=True)", "celery": "app.task(acks_late=True)"}


def app_source(mode: str, queue: str, prefix: str) -> str:
    """The peer's app module: broker, results, the ledger, `part` and `gather`."""
    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    values = {
        "url": URL,
        "queue": queue,
        "results": f"{redis_url}?prefix={prefix}" if mode == "conveyor" else redis_url,
        "prefix": f"{prefix}:",
        "expires": RESULT_EXPIRES_S,
    }
    template = CONVEYOR_APP if mode == "conveyor" else CELERY_APP
    # TASK_SIDE holds braces of its own, so it is appended rather than formatted.
    return template.format(**values) + ledger.TASK_SIDE + TASKS.format(decorator=DECORATORS[mode])


def send_chord(module: Any, mode: str, members: int) -> Any:
    """The chord, sent with the peer's own API; its handle."""
    if mode == "celery":
        from celery import chord

        sent = chord(module.part.s(n) for n in range(members))(module.gather.s())
        # The callback's result by its id alone: the handle the chord returns checks all its
        # members for an error each time it wakes, which for 10,000 members takes longer than
        # the chord itself (minutes): that would time Celery's client, not its chord.
        return module.app.AsyncResult(sent.id)
    from conveyor import chord as conveyor_chord

    return conveyor_chord([module.part.s(n) for n in range(members)], module.gather.s()).delay()


def close_client(mode: str) -> None:
    importlib.import_module("bench_app").app.close()


def measure(mode: str, members: int, timeout: float) -> dict[str, Any]:
    """One peer's run, in this process; raises BenchError unless every check passes."""
    token = uuid.uuid4().hex[:10]
    queue = f"bench-chord-{mode}-{token}"
    prefix = f"bench-chord-{token}"
    peer = make_peer(mode, queue, "prefork", until_empty=False)
    peer = dataclasses.replace(peer, source=app_source(mode, queue, prefix))
    worker = None
    with tempfile.TemporaryDirectory(prefix="bench-chord-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_app.py").write_text(peer.source)
        sys.path.insert(0, tmp)
        os.environ.update(ledger.fresh(workdir / "ledger"))
        try:
            worker = start_worker(peer, workdir)
            asyncio.run(wait_consuming(peer, worker, workdir))
            module = importlib.import_module("bench_app")  # imported before the clock starts
            try:
                began = time.perf_counter()
                handle = send_chord(module, mode, members)
                sent = time.perf_counter()
                try:
                    value = handle.get(timeout=timeout)
                except Exception as exc:  # the peers' timeouts and failures alike
                    raise BenchError(f"no callback result: {type(exc).__name__}: {exc}") from None
                done = time.perf_counter()
            finally:
                close_client(mode)
            if list(value) != [members, 1]:
                raise BenchError(f"the callback got {value!r}, not {members} values in order")
            asyncio.run(stop_and_check(peer, worker, workdir, members + 1))
            balance = ledger.verify(workdir / "ledger", members + 1)
            if not balance.exact:
                raise BenchError(f"the ledger does not balance: {balance.describe()}")
        finally:
            try:
                if worker is not None:
                    kill_group(worker)
                asyncio.run(delete_queues(peer))
            finally:
                delete_keys(REDIS_DB, prefix)  # Celery's keys too: its global_keyprefix
    return {
        "mode": mode,
        "members": members,
        "send_s": round(sent - began, 3),
        "callback_s": round(done - began, 3),
    }


async def delete_queues(peer: Any) -> None:
    from bench.rabbitmq_worker import Probe

    async with Probe() as probe:
        await probe.delete([peer.queue, *peer.side_queues], peer.exchanges)


def run_one(args: argparse.Namespace) -> int:
    # SIGTERM from the harness (its timeout) unwinds through `finally`: nothing is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = measure(args.one, args.members, args.timeout)
    except BenchError as exc:
        print(f"{args.one}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


Runs = dict[str, list[dict[str, Any]]]


def run_rounds(args: argparse.Namespace) -> Runs:
    runs: Runs = {m: [] for m in MODES}
    for round_no in range(args.repeat):
        order = MODES[round_no % len(MODES) :] + MODES[: round_no % len(MODES)]
        for mode in order:
            command = [sys.executable, "-m", "bench.chord", "--one", mode]
            command += ["--members", str(args.members), "--timeout", str(args.timeout)]
            result = one_result(command, mode, START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + args.timeout)
            runs[mode].append(result)
            print(
                f"round {round_no + 1}/{args.repeat}  {mode:<9} send {result['send_s']:7.2f} s"
                f"   send to callback {result['callback_s']:7.2f} s",
                flush=True,
            )
    return runs


def write_report(args: argparse.Namespace, runs: Runs, load: float) -> None:
    import platform
    from importlib.metadata import version

    from bench.__main__ import cpu_model
    from bench.latency import server_versions

    servers = server_versions()
    names = ("conveyor", "celery", "kombu", "aiormq", "redis", "hiredis")
    versions = {name: version(name) for name in names}
    mid = {m: {f: float(statistics.median(r[f] for r in runs[m])) for f in FIGURES} for m in MODES}
    ratio = {f: round(mid["celery"][f] / mid["conveyor"][f], 3) for f in FIGURES}
    met = ratio["callback_s"] >= TARGET
    now = dt.datetime.now(dt.UTC)
    command = "python -m bench.chord " + shlex.join(sys.argv[1:])
    cores = len(os.sched_getaffinity(0))
    lines = [
        "# Benchmarks: a chord on RabbitMQ and Redis",
        "",
        "Written by `python -m bench.chord` (`make bench`); rerun it rather than editing the",
        "figures. The method is at the end.",
        "",
        f"Run on {now:%Y-%m-%d %H:%M} UTC (`{command.strip()}`) against the local RabbitMQ "
        f"{servers['RabbitMQ']} (broker) and Redis {servers['Redis']} (results), one chord of "
        f"{args.members:,} members per run, medians of {args.repeat} round(s), peers "
        "alternating.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; "
        f"Python {platform.python_version()}.",
        f"Machine: `nproc` {cores}, {cpu_model()}; 1-minute load average {load:.2f} at the "
        f"start, {os.getloadavg()[0]:.2f} at the end.",
        "",
        "## Send and send-to-callback",
        "",
        "Seconds (2 slots, prefork, late acks).",
        "",
        "| Worker | send | send to callback |",
        "|---|---:|---:|",
        *(f"| {LABELS[m]} | {mid[m]['send_s']:.2f} | {mid[m]['callback_s']:.2f} |" for m in MODES),
        "",
        f"Celery ÷ conveyor: send {ratio['send_s']:.2f}x, send to callback "
        f"{ratio['callback_s']:.2f}x (above 1: conveyor is faster).",
        "",
        "## Target",
        "",
        f"- Send to callback, Celery ÷ conveyor: {ratio['callback_s']:.2f}x; target at least "
        f"{TARGET:g}x: {'met' if met else 'not met'}.",
        "",
        "## Method",
        "",
        *(__doc__ or "").splitlines()[2:],
        "",
        "## All runs",
        "",
        "| Worker | send (s) | send to callback (s) |",
        "|---|---|---|",
        *(
            f"| {LABELS[m]} | {', '.join(f'{r[FIGURES[0]]:.2f}' for r in runs[m])} | "
            f"{', '.join(f'{r[FIGURES[1]]:.2f}' for r in runs[m])} |"
            for m in MODES
        ),
    ]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")
    data.save(
        "chord",
        {
            "date": now.isoformat(timespec="minutes"),
            "command": command.strip(),
            "machine": {"nproc": cores, "cpu": cpu_model(), "load_1min_start": round(load, 2)},
            "servers": servers,
            "versions": versions,
            "members": args.members,
            "repeat": args.repeat,
            "labels": LABELS,
            "median": mid,
            "ratio": ratio,
            "target": {"figure": "callback_s", "at_least": TARGET, "ratio": ratio["callback_s"]}
            | {"met": met},
            "runs": runs,
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--members", type=int, default=10_000, help="members of the chord")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the report uses medians")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for a callback")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.members < 1 or args.repeat < 1:
        parser.error("--members and --repeat must be at least 1")
    if args.one:
        return run_one(args)
    load = os.getloadavg()[0]
    try:
        runs = run_rounds(args)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    write_report(args, runs, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
