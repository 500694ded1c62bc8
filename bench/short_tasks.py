"""Short tasks on RabbitMQ: 2 ms tasks with 4 children, against the physical limit.

`python -m bench.short_tasks` queues N tasks (4,000 by default) of one task, `work(n)`, that
takes 2 ms, and measures how fast a worker with 4 slots runs them. Two kinds, each a run of its
own:

- **sleep**: `time.sleep(0.002)`, a task that waits (on I/O, say). 4 slots can run at most
  4 ÷ 2 ms = 2,000 tasks/s, whatever the machine: that is the limit the figures are a share of.
- **cpu**: a loop that burns 2 ms of its own thread's CPU time (`time.thread_time()`), so every
  task does the same work however the processes share the cores. On this machine's 2 cores the
  limit is 2 ÷ 2 ms = 1,000 tasks/s, less what the worker's own process, RabbitMQ and this bench
  take from the same 2 cores; 4 children cannot beat it.

A task that takes 2 ms is short against the round trip a worker makes to the broker for its
next task (ack the last one, RabbitMQ pushes the next): a slot that waits for that trip after
every task loses a large share of its time. This is the case conveyor's prefork pool queues a
few tasks in each child for (see docs/getting-started.md, "Short tasks"), and this bench shows
whether the child's next task is at hand when it finishes.

The workers, started from their own command lines, late acks, no results stored:

- conveyor: `conveyor worker bench_app:app --pool prefork -c 4` (4 children), the task declared
  with `@app.task(acks_late=True)` on `Conveyor(..., ignore_results=True)`. With `--baseline
  DIR` the same command runs a second time with DIR first on `PYTHONPATH`, so the worker is the
  conveyor of DIR (a worktree of an earlier commit): the rule before and after, in one run;
- Dramatiq: `dramatiq bench_app -p 4 -t 1` (4 processes of 1 thread) and `-p 1 -t 4` (1 process
  of 4 threads), `RabbitmqBroker` with the default middleware; late acks are its default, its
  prefetch 2 per thread.

The peer's own client publishes all N tasks (conveyor `map()`, Dramatiq `send()`) before the
worker starts, and the queue must hold exactly N: neither publishing nor start-up is timed. Each
task writes the exactly-once ledger line of `bench.ledger`, then a timing line (its number,
process, thread, and `time.monotonic()` when it started and ended, one clock for every process on
Linux), as in `bench.mix`. The bench waits until the ledger holds N lines, sends SIGTERM and
checks what `bench.load_memory` checks: exit status 0, empty queues, a clean log, conveyor's
count of N succeeded, the ledger balanced (every task ran exactly once), and one timing line per
task. A run that fails any of them fails the benchmark, and no report is written.

From the timing lines:

- **tasks/s**: N ÷ (the last task's end - the first task's start), start-up of the pool and the
  tail of the run included;
- **% of limit**: tasks/s as a share of the limit above (2,000 for sleep, 1,000 for cpu);
- **steady**: tasks/s from the 10th to the 90th percentile of the start times, without the
  first tasks (while conveyor learns how long the task takes) and the last;
- **wait per task**: in each slot (a process, or a thread of Dramatiq's), the time from a task's
  end to the start of the slot's next task, the median over all tasks: the time a slot stands
  idle between two tasks, the round-trip stall this bench is about;
- **run**: the mean time a task ran (a 2 ms sleep takes a little more than 2 ms).

Every run is a process of its own (`--one MODE`) with a fresh unique queue, the worker in a new
process group, both removed whatever happens; peers alternate, the order rotating each round,
and the report gives medians over `--repeat` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import ledger
from bench.load_memory import (
    CONVEYOR_APP,
    DRAMATIQ_APP,
    ROOT,
    delete,
    ledger_lines,
    publish,
    rotations,
    run_one,
    setting,
    setting_lines,
    spawn,
    stop_and_verify,
    wait_consuming,
)
from bench.mix import TIMING_SIDE, Row, timings, wait_queued
from bench.rabbitmq_worker import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    URL,
    BenchError,
    Peer,
    kill_group,
    log_tail,
    start_worker,
)

REPORT = ROOT / "docs" / "benchmarks-short-tasks.md"
MODES = ("conveyor", "dramatiq-p4-t1", "dramatiq-p1-t4")
BASELINE = "conveyor-baseline"
LABELS = {
    "conveyor": "conveyor, `--pool prefork -c 4`",
    BASELINE: "conveyor before, `--pool prefork -c 4`",
    "dramatiq-p4-t1": "Dramatiq, `-p 4 -t 1`",
    "dramatiq-p1-t4": "Dramatiq, `-p 1 -t 4`",
}
KINDS = ("sleep", "cpu")
SLOTS = 4
TASK_S = 0.002
POLL_S = 0.02
#: The share of the limit the sleeping tasks must reach (issue 16, "no round-trip stalls").
TARGET = 0.9

SPIN_SIDE = '''

def spin(seconds):
    """Burn `seconds` of this thread's own CPU time, however the cores are shared."""
    end = _time.thread_time() + seconds
    while _time.thread_time() < end:
        pass
'''
BODIES = {
    "sleep": f"""\
    started = _time.monotonic()
    _time.sleep({TASK_S!r})
    record(n)
    timed(n, started)""",
    "cpu": f"""\
    started = _time.monotonic()
    spin({TASK_S!r})
    record(n)
    timed(n, started)""",
}


def limit(kind: str) -> float:
    """The most tasks/s the slots (sleep) or the cores (cpu) allow."""
    if kind == "sleep":
        return SLOTS / TASK_S
    return min(SLOTS, len(os.sched_getaffinity(0))) / TASK_S


def make_peer(mode: str, queue: str, kind: str, workdir: Path, baseline: Path | None) -> Peer:
    """The worker command for `mode`, with this scenario's app module."""
    bin_dir = Path(sys.executable).parent  # the bench venv's own console scripts
    side = ledger.TASK_SIDE + TIMING_SIDE + SPIN_SIDE
    if mode in ("conveyor", BASELINE):
        from conveyor.brokers.rabbitmq import BUCKETS_MS

        command = [str(bin_dir / "conveyor"), "worker", "bench_app:app", "--pool", "prefork"]
        command += ["-c", str(SLOTS)]
        if mode == BASELINE:
            assert baseline is not None
            # The baseline's package is found first: its worker, this bench's app module.
            command = ["env", f"PYTHONPATH={workdir}{os.pathsep}{baseline}", *command]
        source = CONVEYOR_APP.format(url=URL, queue=queue, side=side, body=BODIES[kind])
        dead = [f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)]
        return Peer(mode, queue, source, command, dead, [], 1)
    processes, threads = (part[1:] for part in mode.removeprefix("dramatiq-").split("-"))
    command = [str(bin_dir / "dramatiq"), "bench_app", "-p", processes, "-t", threads]
    source = DRAMATIQ_APP.format(url=URL, queue=queue, side=side, body=BODIES[kind])
    return Peer(mode, queue, source, command, [f"{queue}.DQ", f"{queue}.XQ"], [], int(processes))


def figures(mode: str, kind: str, rows: list[Row], n: int) -> dict[str, Any]:
    starts = sorted(r[3] for r in rows)
    first, last_end = starts[0], max(r[4] for r in rows)
    low, high = starts[n // 10], starts[n * 9 // 10]
    by_slot: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _, pid, tid, start, end in rows:
        by_slot.setdefault((pid, tid), []).append((start, end))
    waits = []
    for runs in by_slot.values():
        runs.sort()
        waits += [b[0] - a[1] for a, b in itertools.pairwise(runs)]
    per_s = n / (last_end - first)
    return {
        "mode": mode,
        "kind": kind,
        "tasks": n,
        "per_s": round(per_s, 1),
        "share_of_limit": round(per_s / limit(kind), 3),
        "steady_per_s": round((n * 9 // 10 - n // 10) / (high - low), 1) if high > low else 0.0,
        "wait_ms": round(statistics.median(waits) * 1000, 3) if waits else 0.0,
        "mean_wait_ms": round(statistics.fmean(waits) * 1000, 3) if waits else 0.0,
        "run_ms": round(statistics.fmean(r[4] - r[3] for r in rows) * 1000, 3),
        "slots_used": len(by_slot),
    }


async def run_tasks(
    peer: Peer, worker: subprocess.Popen[bytes], workdir: Path, ledger_dir: Path, n: int
) -> None:
    await wait_consuming(peer, worker)
    deadline = time.monotonic() + START_TIMEOUT_S + n / 50
    while (done := ledger_lines(ledger_dir)) < n:
        if worker.poll() is not None:
            raise BenchError(f"the worker exited early:\n{log_tail(workdir)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{done:,} of {n:,} tasks ran by the deadline")
        await asyncio.sleep(POLL_S)
    await stop_and_verify(peer, worker, workdir, ledger_dir, n)


def measure(mode: str, kind: str, n: int, baseline: Path | None) -> dict[str, Any]:
    """One peer's run of one kind, in this process; raises BenchError unless it checks out."""
    queue = f"bench-short-{mode}-{uuid.uuid4().hex[:8]}"
    worker = None
    with tempfile.TemporaryDirectory(prefix="bench-short-") as tmp:
        workdir = Path(tmp)
        peer = make_peer(mode, queue, kind, workdir, baseline)
        (workdir / "bench_app.py").write_text(peer.source)
        sys.path.insert(0, tmp)
        os.environ.update(ledger.fresh(workdir / "ledger"))  # start_worker passes it on
        try:
            client = "conveyor" if mode.startswith("conveyor") else "dramatiq"
            publish(client, [(i, 0.0) for i in range(n)])
            asyncio.run(wait_queued(queue, n))
            worker = start_worker(peer, workdir)
            asyncio.run(run_tasks(peer, worker, workdir, workdir / "ledger", n))
            return figures(mode, kind, timings(workdir / "ledger", n), n)
        finally:
            if worker is not None:
                kill_group(worker)
            asyncio.run(delete(peer))


def describe(baseline: Path) -> str:
    """The baseline's commit, in words, for the report."""
    found = subprocess.run(
        ["git", "-C", str(baseline), "log", "-1", "--format=%h (%cs) %s"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or str(baseline)


Runs = dict[str, dict[str, list[dict[str, Any]]]]
"""kind -> mode -> runs."""


def write_report(
    args: argparse.Namespace, info: dict[str, Any], modes: tuple[str, ...], runs: Runs
) -> None:
    keys = ("per_s", "share_of_limit", "steady_per_s", "wait_ms", "mean_wait_ms", "run_ms")
    medians = {
        kind: {m: {k: statistics.median(r[k] for r in runs[kind][m]) for k in keys} for m in modes}
        for kind in args.kinds
    }
    rounds = f"{args.repeat} round{'s' if args.repeat > 1 else ''}"
    lines = [
        "# Benchmarks: short tasks, 2 ms each, 4 slots",
        "",
        "Written by `python -m bench.short_tasks` (`make bench`); rerun it rather than editing",
        "the figures. The method is at the end; the figures are in",
        "docs/bench-data/short_tasks.json.",
        "",
        f"Run on {info['date'][:16].replace('T', ' ')} UTC against the local RabbitMQ: "
        f"{args.tasks:,} tasks per run; medians of {rounds}, peers alternating, each run in",
        "its own process on a fresh queue.",
        *setting_lines(info),
    ]
    if args.baseline is not None:
        lines += ["", f"conveyor before: the worker of {info['baseline']}."]
    for kind in args.kinds:
        title = {
            "sleep": "2 ms `time.sleep` tasks: limit 4 ÷ 2 ms = 2,000 tasks/s",
            "cpu": (
                f"2 ms CPU tasks: limit {info['cpus']} cores ÷ 2 ms = "
                f"{limit(kind):,.0f} tasks/s, not reachable"
            ),
        }[kind]
        lines += [
            "",
            f"## {title}",
            "",
            "| Worker | tasks/s | % of limit | steady tasks/s | wait per task (ms) | "
            "mean wait (ms) | run (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in modes:
            f = medians[kind][m]
            lines.append(
                f"| {LABELS[m]} | {f['per_s']:,.0f} | {f['share_of_limit']:.0%} | "
                f"{f['steady_per_s']:,.0f} | {f['wait_ms']:.2f} | {f['mean_wait_ms']:.2f} | "
                f"{f['run_ms']:.2f} |"
            )
    if "sleep" in args.kinds:
        run = medians["sleep"]["conveyor"]["run_ms"]
        ceiling = SLOTS / (run / 1000)
        lines += [
            "",
            f"A 2 ms sleep took {run:.2f} ms here (the kernel's timer slack and wake-up): with no "
            f"wait at all between tasks, {SLOTS} slots would run {ceiling:,.0f} tasks/s,",
            f"{ceiling / limit('sleep'):.0%} of the limit.",
        ]
    if "cpu" in args.kinds:
        lines += [
            "",
            f"The CPU tasks share {info['cpus']} cores with the worker's own process (which reads "
            "every delivery and writes every ack), RabbitMQ and this bench: the limit above is",
            "what the cores would give the tasks alone.",
        ]
    lines += [
        "",
        "## Method",
        "",
        *(__doc__ or "").splitlines()[2:],
        "",
        "## All runs",
        "",
        "| Kind | Worker | tasks/s | wait per task (ms) |",
        "|---|---|---|---|",
    ]
    for kind in args.kinds:
        for m in modes:
            rates = ", ".join(f"{r['per_s']:,.0f}" for r in runs[kind][m])
            waits = ", ".join(f"{r['wait_ms']:.2f}" for r in runs[kind][m])
            lines.append(f"| {kind} | {LABELS[m]} | {rates} | {waits} |")
    REPORT.write_text("\n".join(lines) + "\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("## 2 ms"))
    print("\n".join(lines[start : lines.index("## Method")]))
    print(f"wrote {REPORT}")

    from bench import data

    data.save(
        "short_tasks",
        {
            **info,
            "command": "python -m bench.short_tasks " + " ".join(sys.argv[1:]),
            "tasks": args.tasks,
            "task_s": TASK_S,
            "slots": SLOTS,
            "repeat": args.repeat,
            "kinds": list(args.kinds),
            "limits": {kind: limit(kind) for kind in args.kinds},
            "target_share": TARGET,
            "labels": {m: LABELS[m] for m in modes},
            "medians": medians,
            "runs": runs,
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000, help="tasks per run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the report uses medians")
    parser.add_argument(
        "--kinds",
        type=lambda text: tuple(text.split(",")),
        default=KINDS,
        help="sleep, cpu or both (sleep,cpu)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a conveyor source tree (a worktree of an earlier commit) to run beside this one",
    )
    parser.add_argument("--one", choices=(*MODES, BASELINE), help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tasks < 100 or args.repeat < 1 or not set(args.kinds) <= set(KINDS):
        parser.error("--tasks must be at least 100, --repeat at least 1, --kinds of sleep,cpu")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "conveyor" / "__init__.py").exists():
            parser.error(f"--baseline {args.baseline}: no conveyor package there")
    if args.one:
        return run_one(args.one, lambda: measure(args.one, args.kind, args.tasks, args.baseline))
    modes = (MODES[0], BASELINE, *MODES[1:]) if args.baseline is not None else MODES
    load = os.getloadavg()[0]
    runs: Runs = {kind: {m: [] for m in modes} for kind in args.kinds}
    timeout = 2 * START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + args.tasks / 20
    extra = ["--baseline", str(args.baseline)] if args.baseline is not None else []
    try:
        for kind in args.kinds:
            for round_no, mode in rotations(modes, args.repeat):
                options = ["--kind", kind, "--tasks", str(args.tasks), *extra]
                result = spawn("bench.short_tasks", mode, options, timeout)
                runs[kind][mode].append(result)
                print(
                    f"round {round_no + 1}/{args.repeat}  {kind:<5} {mode:<17} "
                    f"{result['per_s']:7,.0f} tasks/s ({result['share_of_limit']:.0%} of the "
                    f"limit)  wait per task {result['wait_ms']:.2f} ms",
                    flush=True,
                )
        info = setting(load)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    if args.baseline is not None:
        info["baseline"] = describe(args.baseline)
    write_report(args, info, modes, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
