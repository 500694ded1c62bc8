"""A realistic mix on RabbitMQ: 1% of tasks sleep 1 s, the rest are no-ops. Do short tasks wait?

`python -m bench.mix` queues N tasks (2,000 by default) of one task, `work(n, seconds)`: every
100th (n = 99, 199, ...) sleeps 1 s, the others return at once. The order is shuffled with a
fixed seed, the same for every peer and run, and the peer's own client publishes all of them
(conveyor `map()`, Dramatiq `send()`, Celery `apply_async()`) before the worker starts; the queue
must hold exactly N. One task name for both kinds on purpose: how long a task will take is not
known from its name, as with a task whose input is sometimes large.

The workers, started from their own command lines, late acks, no results stored:

- conveyor: `conveyor worker bench_app:app --pool prefork -c 2` (2 slots);
- Dramatiq: `dramatiq bench_app -p 2 -t 8` (its best configuration on RabbitMQ, 16 slots: the
  sleeping tasks hold threads, not processes) and `-p 2 -t 1` (2 slots, like the others);
- Celery: `celery -A bench_app worker -P prefork -c 2 -l WARNING --without-gossip
  --without-mingle --without-heartbeat`, `task_acks_late=True`, no result backend (2 slots).

Every run is a process of its own (`--one MODE`) with a fresh unique queue, the worker in a new
process group, both removed whatever happens; peers alternate, the order rotating each round, and
the report gives medians over `--repeat` rounds. Each task writes the exactly-once ledger line of
`bench.ledger`, then a timing line: its number, process, thread, and `time.monotonic()` (one clock
for every process on Linux) when it started and ended. The bench waits until the ledger holds N
lines, sends SIGTERM and checks what `bench.load_memory` checks (exit status 0, empty queues, a
clean log, conveyor's count of N succeeded, the ledger balanced, and one timing line per task).

From the timing lines:

- **total**: from the first task's start (the worker's first delivery) to the last task's end;
- **bound**: the least total the worker's slots allow, ceil(long tasks / slots) x 1 s: with 20
  long tasks, 10 s for 2 slots and 2 s for Dramatiq's 16 threads;
- **stalled slot-seconds**: a slot is one process of a pool, or one thread of Dramatiq. While
  some task has not started yet (up to the start of the last one), every stretch longer than
  50 ms in which a slot runs nothing counts. All N tasks are queued from the start, so a slot
  idle then means work was held where it could not run: most often short tasks a busy child had
  already taken, waiting behind a sleeping one (head-of-line blocking). Gaps between two short
  tasks (well under a millisecond) do not count. This is the figure that shows head-of-line
  blocking: the total mixes it with the capacity every 2-slot worker lacks, since while both
  slots sleep, every short task waits whatever the worker does;
- **last short start**: when the last short task started, from the first start.

With 2 slots the total cannot beat 10 s; a worker that never lets a short task wait behind a
long one while a slot is free comes close to it, with no stalled slot-seconds. The ratio
conveyor ÷ peer of the totals is below 1 when conveyor finished first.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
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
    ROOT,
    delete,
    ledger_lines,
    make_run_peer,
    publish,
    rotations,
    run_one,
    setting,
    setting_lines,
    spawn,
    stop_and_verify,
    wait_consuming,
)
from bench.rabbitmq_worker import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BenchError,
    Peer,
    Probe,
    kill_group,
    log_tail,
    start_worker,
)

REPORT = ROOT / "docs" / "benchmarks-mix.md"
MODES = ("conveyor", "dramatiq-t8", "dramatiq-t1", "celery")
LABELS = {
    "conveyor": "conveyor, `--pool prefork -c 2`",
    "dramatiq-t8": "Dramatiq, `-p 2 -t 8`",
    "dramatiq-t1": "Dramatiq, `-p 2 -t 1`",
    "celery": "Celery, `-P prefork -c 2`",
}
SLOTS = {"conveyor": 2, "dramatiq-t8": 16, "dramatiq-t1": 2, "celery": 2}
LONG_EVERY = 100
LONG_S = 1.0
SEED = 20_240_611
STALL_S = 0.05
POLL_S = 0.02
PROGRESS_POINTS = 101

TIMING_SIDE = '''
import threading as _threading
import time as _time

_times_fd = None
_times_pid = 0


def timed(n, started):
    """Note when task n started and ended, in which process and thread."""
    global _times_fd, _times_pid
    pid = _os.getpid()
    if _times_fd is None or _times_pid != pid:
        path = _os.path.join(_os.environ["BENCH_LEDGER"], f"{pid}-{_os.urandom(4).hex()}.times")
        _times_fd = _os.open(path, _os.O_WRONLY | _os.O_CREAT | _os.O_APPEND, 0o644)
        _times_pid = pid
    line = b"%d %d %d %.6f %.6f\\n" % (
        n, pid, _threading.get_native_id(), started, _time.monotonic()
    )
    _os.write(_times_fd, line)
'''
BODY = """\
    started = _time.monotonic()
    if seconds:
        _time.sleep(seconds)
    record(n)
    timed(n, started)"""


def tasks(n: int) -> list[tuple[int, float]]:
    """(number, seconds) in the order they are published: the same for every peer and run."""
    items = [(i, LONG_S if i % LONG_EVERY == LONG_EVERY - 1 else 0.0) for i in range(n)]
    random.Random(SEED).shuffle(items)
    return items


Row = tuple[int, int, int, float, float]
"""A timing line: task number, pid, thread id, start, end."""


def timings(directory: Path, n: int) -> list[Row]:
    rows: list[Row] = []
    for path in directory.glob("*.times"):
        for line in path.read_text().splitlines():
            task, pid, tid, start, end = line.split()
            rows.append((int(task), int(pid), int(tid), float(start), float(end)))
    if sorted(r[0] for r in rows) != list(range(n)):
        raise BenchError(f"expected one timing line per task, found {len(rows):,} lines")
    return rows


def stalled(rows: list[Row], slots: int) -> float:
    """Slot-seconds idle in stretches over STALL_S while some task had not started."""
    first = min(r[3] for r in rows)
    last_start = max(r[3] for r in rows)
    by_slot: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _, pid, tid, start, end in rows:
        by_slot.setdefault((pid, tid), []).append((start, end))
    idle = max(0, slots - len(by_slot)) * (last_start - first)  # a slot that never ran a task
    for runs in by_slot.values():
        runs.sort()
        free_from = first
        for start, end in runs:
            gap = min(start, last_start) - free_from
            if gap > STALL_S:
                idle += gap
            free_from = max(free_from, end)
        if last_start - free_from > STALL_S:
            idle += last_start - free_from
    return idle


def figures(mode: str, rows: list[Row], n: int) -> dict[str, Any]:
    first = min(r[3] for r in rows)
    longs = sum(1 for r in rows if r[0] % LONG_EVERY == LONG_EVERY - 1)
    short_starts = sorted(r[3] - first for r in rows if r[0] % LONG_EVERY != LONG_EVERY - 1)
    starts = sorted(r[3] - first for r in rows)
    step = (len(starts) - 1) / (PROGRESS_POINTS - 1)
    return {
        "mode": mode,
        "tasks": n,
        "long_tasks": longs,
        "slots": SLOTS[mode],
        "total_s": round(max(r[4] for r in rows) - first, 3),
        "bound_s": math.ceil(longs / SLOTS[mode]) * LONG_S,
        "stalled_slot_s": round(stalled(rows, SLOTS[mode]), 3),
        "last_short_start_s": round(short_starts[-1], 3),
        "processes": len({r[1] for r in rows}),
        "threads": len({(r[1], r[2]) for r in rows}),
        "progress_s": [round(starts[round(i * step)], 3) for i in range(PROGRESS_POINTS)],
    }


async def run_mix(
    peer: Peer, worker: subprocess.Popen[bytes], workdir: Path, ledger_dir: Path, n: int
) -> dict[str, Any]:
    await wait_consuming(peer, worker)
    deadline = time.monotonic() + START_TIMEOUT_S + n / 50 + n / LONG_EVERY * LONG_S
    while (done := ledger_lines(ledger_dir)) < n:
        if worker.poll() is not None:
            raise BenchError(f"the worker exited early:\n{log_tail(workdir)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{done:,} of {n:,} tasks ran by the deadline")
        await asyncio.sleep(POLL_S)
    await stop_and_verify(peer, worker, workdir, ledger_dir, n)
    return figures(peer.mode, timings(ledger_dir, n), n)


async def wait_queued(queue: str, n: int) -> None:
    """Until the queue holds exactly n (a publisher without confirms may still be sending)."""
    async with Probe() as probe:
        deadline = time.monotonic() + 30
        while (queued := await probe.ready(queue)) != n:
            if queued > n or time.monotonic() > deadline:
                raise BenchError(f"expected {n} tasks in the queue before starting, found {queued}")
            await asyncio.sleep(0.05)


def measure(mode: str, n: int) -> dict[str, Any]:
    """One peer's run, in this process; raises BenchError unless it checks out."""
    queue = f"bench-mix-{mode}-{uuid.uuid4().hex[:8]}"
    peer = make_run_peer(mode, queue, ledger.TASK_SIDE + TIMING_SIDE, BODY)
    worker = None
    with tempfile.TemporaryDirectory(prefix="bench-mix-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_app.py").write_text(peer.source)
        sys.path.insert(0, tmp)
        os.environ.update(ledger.fresh(workdir / "ledger"))  # start_worker passes it on
        try:
            publish(mode, tasks(n))
            asyncio.run(wait_queued(queue, n))
            worker = start_worker(peer, workdir)
            return asyncio.run(run_mix(peer, worker, workdir, workdir / "ledger", n))
        finally:
            if worker is not None:
                kill_group(worker)
            asyncio.run(delete(peer))


def write_report(args: argparse.Namespace, info: dict[str, Any], runs: dict[str, Any]) -> None:
    def med(mode: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[mode]))

    medians = {
        m: {k: med(m, k) for k in ("total_s", "bound_s", "stalled_slot_s", "last_short_start_s")}
        for m in MODES
    }
    total = {m: medians[m]["total_s"] for m in MODES}
    ratios = {m: round(total["conveyor"] / total[m], 2) for m in MODES if m != "conveyor"}
    # The run whose total is the median (the first of the two middle ones): its progress curve.
    typical = {
        m: sorted(runs[m], key=lambda r: r["total_s"])[(len(runs[m]) - 1) // 2]["progress_s"]
        for m in MODES
    }
    longs = runs[MODES[0]][0]["long_tasks"]
    rounds = f"{args.repeat} round{'s' if args.repeat > 1 else ''}"
    lines = [
        "# Benchmarks: a realistic mix, 1% of tasks sleep 1 s",
        "",
        "Written by `python -m bench.mix` (`make bench`); rerun it rather than editing the",
        "figures. The method is at the end; the figures are in docs/bench-data/mix.json.",
        "",
        f"Run on {info['date'][:16].replace('T', ' ')} UTC against the local RabbitMQ: "
        f"{args.tasks:,} tasks per run, {longs} of them sleeping {LONG_S:g} s, in one shuffled",
        f"order (seed {SEED}); medians of {rounds}, peers alternating, each run in its own "
        "process on a fresh queue.",
        *setting_lines(info),
        "",
        "## Total time and waiting",
        "",
        "Seconds from the first task's start to the last task's end. Bound: the least total "
        "the worker's slots allow. Stalled: slot-seconds a slot stood idle over 50 ms while "
        "tasks had not started yet; above zero, work was waiting where it could not run "
        "(head-of-line blocking). Ratio: conveyor's total ÷ the row's (below 1: conveyor "
        "finished first).",
        "",
        "| Worker | slots | total (s) | bound (s) | stalled (slot-s) | last short start (s) "
        "| conveyor ÷ row |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODES:
        f = medians[m]
        ratio = "1" if m == "conveyor" else f"{ratios[m]:.2f}x"
        lines.append(
            f"| {LABELS[m]} | {SLOTS[m]} | {f['total_s']:.2f} | {f['bound_s']:.0f} | "
            f"{f['stalled_slot_s']:.2f} | {f['last_short_start_s']:.2f} | {ratio} |"
        )
    lines += [
        "",
        "## Method",
        "",
        *(__doc__ or "").splitlines()[2:],
        "",
        "## All runs",
        "",
        "| Worker | total (s) | stalled (slot-s) |",
        "|---|---|---|",
    ]
    for m in MODES:
        totals = ", ".join(f"{r['total_s']:.2f}" for r in runs[m])
        stalls = ", ".join(f"{r['stalled_slot_s']:.2f}" for r in runs[m])
        lines.append(f"| {LABELS[m]} | {totals} | {stalls} |")
    REPORT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[lines.index("## Total time and waiting") : lines.index("## Method")]))
    print(f"wrote {REPORT}")

    from bench import data

    data.save(
        "mix",
        {
            **info,
            "command": "python -m bench.mix " + " ".join(sys.argv[1:]),
            "tasks": args.tasks,
            "long_every": LONG_EVERY,
            "long_s": LONG_S,
            "seed": SEED,
            "repeat": args.repeat,
            "labels": {m: LABELS[m] for m in MODES},
            "slots": SLOTS,
            "medians": medians,
            "ratios_conveyor_over": ratios,
            "progress_s": typical,
            "progress_note": "start time of the task at each percentile of the run (0..100%)",
            "runs": runs,
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per run, 1%% long")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the report uses medians")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tasks < LONG_EVERY or args.repeat < 1:
        parser.error(f"--tasks must be at least {LONG_EVERY} and --repeat at least 1")
    if args.one:
        return run_one(args.one, lambda: measure(args.one, args.tasks))
    load = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    timeout = 2 * START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + args.tasks / 20
    try:
        for round_no, mode in rotations(MODES, args.repeat):
            result = spawn("bench.mix", mode, ["--tasks", str(args.tasks)], timeout)
            runs[mode].append(result)
            print(
                f"round {round_no + 1}/{args.repeat}  {mode:<12} total {result['total_s']:6.2f}s"
                f"  (bound {result['bound_s']:.0f}s)  stalled {result['stalled_slot_s']:.2f}"
                " slot-s"
            )
        info = setting(load)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    write_report(args, info, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
