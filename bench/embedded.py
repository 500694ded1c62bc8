"""Benchmark conveyor's embedded SQLite broker against Huey's SQLite storage, side by side.

`python -m bench.embedded` (part of `make bench`) starts one runner subprocess per measurement,
so the peers never share an interpreter, imports or a database, and alternates them (conveyor, Huey,
conveyor, Huey, ...) so slow drift on the machine hits both alike. Every runner enqueues the
no-op tasks from one producer and then drains them with two workers, either two threads in one
process or two processes. The report is the median of each figure over the rounds and the ratio
conveyor/Huey of the medians; it is printed and written to docs/benchmarks-embedded.md (the
figures also to docs/bench-data/embedded.json, for the summary and charts).

A runner that loses or repeats a task exits non-zero, and then this harness stops without writing
a report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
REPORT = ROOT / "docs" / "benchmarks-embedded.md"

PEERS = ("conveyor", "huey")
PEER_LABELS = {"conveyor": "conveyor", "huey": "Huey"}
# Command-line variant name -> the runners' --worker-type.
VARIANTS = {"threads": "thread", "processes": "process"}
VARIANT_LABELS = {"threads": "2 threads", "processes": "2 processes"}
FIGURES = {"enqueue_per_s": "enqueue", "process_per_s": "processing"}
WORKERS = 2
TARGET = 2.0
# A line of conveyor's own format at INFO: `2025-06-01 12:00:00,123 INFO    [pid/thread] ...`.
INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ")
"""conveyor must reach at least this multiple of Huey's rate on every figure."""

console = Console()


class BenchError(Exception):
    """A runner failed or printed something that is not a valid result: no report is written."""


@dataclass
class Results:
    """Every run's JSON line, by variant and peer, in the order they ran."""

    runs: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, variant: str, peer: str, result: dict[str, Any]) -> None:
        self.runs.setdefault((variant, peer), []).append(result)

    def median(self, variant: str, peer: str, figure: str) -> float:
        return float(statistics.median(r[figure] for r in self.runs[(variant, peer)]))

    def ratio(self, variant: str, figure: str) -> float:
        return self.median(variant, "conveyor", figure) / self.median(variant, "huey", figure)

    def version(self, peer: str) -> str:
        return str(next(r["version"] for (_, p), rs in self.runs.items() if p == peer for r in rs))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks per run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the report uses medians")
    parser.add_argument("--only", choices=tuple(VARIANTS), help="run one worker variant only")
    parser.add_argument("--dir", default=None, help="where the runners create their databases")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a runner may take to drain the queue"
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"do not rewrite {REPORT.relative_to(ROOT)}"
    )
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.repeat < 1:
        parser.error("--tasks and --repeat must be at least 1")
    return args


def run_peer(peer: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one peer's runner in a fresh interpreter; its validated JSON result."""
    command = [
        sys.executable,
        str(BENCH_DIR / f"{peer}_runner.py"),
        "--tasks", str(args.tasks),
        "--workers", str(WORKERS),
        "--worker-type", VARIANTS[variant],
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    if args.dir:
        command += ["--dir", args.dir]
    try:
        # The runner enforces --timeout on the drain; this margin covers the enqueue and start-up.
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=args.timeout * 2 + 60,
            check=False,  # a failure is reported below, with the runner's stderr
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{peer} ({variant}) did not finish in time") from None
    if done.returncode != 0:
        raise BenchError(
            f"{peer} ({variant}) failed with exit code {done.returncode}:\n{done.stderr.strip()}"
        )
    # Runners are quiet when all is well but for conveyor's INFO lines (its default logging,
    # which the run includes); anything else (a warning, say) belongs in view.
    noteworthy = [line for line in done.stderr.splitlines() if not INFO_LINE.match(line)]
    if "".join(noteworthy).strip():
        console.print(f"[yellow]{peer} ({variant}) stderr:[/]\n" + "\n".join(noteworthy))
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{peer} ({variant}) printed no JSON line:\n{done.stdout}") from None
    expected = {
        "peer": peer,
        "tasks": args.tasks,
        "workers": WORKERS,
        "worker_type": VARIANTS[variant],
    }
    wrong = {k: result.get(k) for k, v in expected.items() if result.get(k) != v}
    rates = [result.get(f) for f in FIGURES]
    if wrong or not all(isinstance(r, int | float) and r > 0 for r in rates):
        raise BenchError(f"{peer} ({variant}) reported an unexpected result: {result}")
    return result


def run_all(args: argparse.Namespace) -> Results:
    """Every round: for each variant, conveyor then Huey."""
    results = Results()
    variants = [args.only] if args.only else list(VARIANTS)
    for round_no in range(1, args.repeat + 1):
        for variant in variants:
            for peer in PEERS:
                result = run_peer(peer, variant, args)
                results.add(variant, peer, result)
                console.print(
                    f"round {round_no}/{args.repeat}  {variant:<9}  {PEER_LABELS[peer]:<8}  "
                    f"enqueue {result['enqueue_per_s']:>10,.0f}/s  "
                    f"process {result['process_per_s']:>8,.0f}/s"
                )
    return results


def verdict(ratio: float) -> str:
    return "met" if ratio >= TARGET else "not met"


def summary_table(results: Results, variants: list[str]) -> Table:
    table = Table(title=f"Medians (tasks/s); target: conveyor at least {TARGET:g}x Huey")
    table.add_column("Workers")
    table.add_column("Figure")
    for peer in PEERS:
        table.add_column(PEER_LABELS[peer], justify="right")
    table.add_column("conveyor/Huey", justify="right")
    table.add_column("Target")
    for variant in variants:
        for figure, name in FIGURES.items():
            ratio = results.ratio(variant, figure)
            style = "green" if ratio >= TARGET else "red"
            table.add_row(
                VARIANT_LABELS[variant],
                name,
                *(f"{results.median(variant, p, figure):,.0f}" for p in PEERS),
                f"[{style}]{ratio:.2f}x[/]",
                f"[{style}]{verdict(ratio)}[/]",
            )
    return table


# The machine, for the report.


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def filesystem(path: str) -> str:
    """The filesystem type under `path`: on tmpfs an fsync costs nothing, which changes figures."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                mount_point, fs_type = parts[1], parts[2]
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) > len(best):
                    best, kind = mount_point, fs_type
    except (OSError, IndexError):
        pass
    return kind


def machine(args: argparse.Namespace) -> dict[str, str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    db_dir = os.path.realpath(args.dir or tempfile.gettempdir())
    return {
        "CPU": cpu_model(),
        "Cores": str(cores) if usable == cores else f"{cores} ({usable} usable by this process)",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
        "Database directory": f"{db_dir} ({filesystem(db_dir)})",
        # Anything else running shifts both peers' figures; this says whether the machine was idle.
        "Load average at the end (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# The report.


def durability(results: Results, variants: list[str]) -> str:
    """Which commits paid an fsync, from what the runners read back from SQLite."""

    def synchronous(peer: str) -> Any:
        sqlite = results.runs[(variants[0], peer)][0]["settings"].get("sqlite", {})
        return sqlite.get("synchronous", "unknown")

    conveyor, huey = synchronous("conveyor"), synchronous("huey")
    if isinstance(conveyor, dict):
        conveyor = ", ".join(f"{role} {level}" for role, level in conveyor.items())
    return (
        f"- `synchronous` per connection: Huey {huey} for everything (one shared connection per\n"
        f"  process); conveyor {conveyor}."
    )


def command_line() -> str:
    return shlex.join(["python", "-m", "bench", *sys.argv[1:]])


def settings_by_variant(results: Results, peer: str, variants: list[str]) -> list[str]:
    """Markdown for a peer's settings: once if both variants used the same, else per variant.

    Figures measured per run (how long spawning took) are left out, so only real differences
    split the listing.
    """

    def stable(settings: dict[str, Any]) -> dict[str, Any]:
        worker = settings.get("worker")
        if isinstance(worker, dict):
            worker = {k: v for k, v in worker.items() if not k.endswith("_not_timed")}
            settings = {**settings, "worker": worker}
        return settings

    by_variant = {v: stable(results.runs[(v, peer)][0]["settings"]) for v in variants}
    distinct = list({json.dumps(s, sort_keys=True): s for s in by_variant.values()}.values())
    out: list[str] = []
    for variant, settings in by_variant.items():
        if len(distinct) > 1:
            out.append(f"{VARIANT_LABELS[variant]}:\n")
        out += ["```json", json.dumps(settings, indent=2), "```", ""]
        if len(distinct) == 1:
            break
    return out


def report(results: Results, args: argparse.Namespace, variants: list[str]) -> str:
    conveyor_version, huey_version = results.version("conveyor"), results.version("huey")
    lines = [
        "# Benchmarks",
        "",
        "conveyor's embedded SQLite broker against Huey's SQLite storage, measured side by side on",
        "the same machine in the same run. This file is written by `python -m bench`",
        "(`make bench`); rerun it rather than editing the figures.",
        "",
        f"Run on {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in machine(args).items()),
        f"- conveyor {conveyor_version}, Huey {huey_version}",
        "",
        "## Command",
        "",
        "```",
        command_line(),
        "```",
        "",
        f"{args.tasks:,} no-op tasks per run, {args.repeat} round(s); each round runs, per worker",
        "variant, conveyor then Huey, each in its own subprocess with a fresh SQLite file.",
        "",
        "## Method",
        "",
        "- Enqueue: one producer sends all tasks before any worker starts. conveyor uses",
        "  `Task.map()`, its bulk send (one transaction for all tasks). Huey has no bulk enqueue;",
        "  its runner calls the task once per task (one transaction each).",
        "- Processing: two workers drain the queue, as two threads in one process or as two",
        "  processes. conveyor: `Worker(pool='threads', concurrency=2, until_empty=True)`, or",
        "  `Worker(pool='prefork', concurrency=2, until_empty=True)` (its default pool: a worker",
        "  process and two children), timed from `run()`, which forks the children, until it",
        "  returns. Its logging is `conveyor worker`'s default: INFO on stderr, a line per task",
        "  while at most 10 finish a second and a summary every 5 s above that.",
        "  Huey: its consumer, timed from `Consumer.start()` (which forks its processes) until",
        "  the last task's `complete` signal.",
        "- A run counts only if every task ran exactly once and the queue ended empty; the runners",
        "  check this and the harness stops otherwise.",
        "",
        f"## Results (medians of {args.repeat} run(s), tasks/s)",
        "",
        "| Workers | Figure | conveyor | Huey | conveyor/Huey |",
        "|---|---|---:|---:|---:|",
    ]
    for variant in variants:
        for figure, name in FIGURES.items():
            lines.append(
                f"| {VARIANT_LABELS[variant]} | {name} | "
                + " | ".join(f"{results.median(variant, p, figure):,.0f}" for p in PEERS)
                + f" | {results.ratio(variant, figure):.2f}x |"
            )
    lines += [
        "",
        "## Target",
        "",
        f"conveyor at least {TARGET:g}x Huey on both enqueue and processing.",
        "",
    ]
    for variant in variants:
        for figure, name in FIGURES.items():
            ratio = results.ratio(variant, figure)
            lines.append(
                f"- {name.capitalize()}, {VARIANT_LABELS[variant]} run: {verdict(ratio)} "
                f"({ratio:.2f}x)."
            )
    lines += [
        "",
        "## Where the time goes",
        "",
        "Profiled with py-spy and strace on this machine (see the commit history for the steps):",
        "",
        "- One worker round is one SQLite transaction: store the finished tasks' results, delete",
        "  their messages, claim as many messages as there are free slots. Its commit writes",
        "  about six WAL frames (the message table and its claim index, the result table and its",
        "  expiry index), roughly 100 microseconds here; the rest of a no-op task is Python.",
        "- 2 threads: the thread that finished a task runs the next round itself, so work does",
        "  not pass through the event loop. Handing each outcome to the loop and back cost as",
        "  much as the round itself (many futex waits for the GIL per task).",
        "- 2 processes: each solo worker claims one message per round, and every commit by one",
        "  process discards the other's page cache, so each round re-reads about fourteen pages",
        "  and the write lock changes hands between processes once per task. Huey's processes",
        "  pay the same, which is why both peers' process figures are close to their thread",
        "  figures; conveyor's lead there is smaller than with threads.",
        "",
        "## Settings",
        "",
        "As each runner reported them. `synchronous` is SQLite's PRAGMA value: 2 is FULL (fsync",
        "at every commit), 1 is NORMAL (in WAL mode, fsync only at checkpoints).",
        "",
        "### conveyor",
        "",
        *settings_by_variant(results, "conveyor", variants),
        "### Huey",
        "",
        *settings_by_variant(results, "huey", variants),
        "## Differences between the peers",
        "",
        "- Enqueue compares conveyor's bulk send with Huey's per-task enqueue, because Huey offers",
        "  nothing else; per-task sending (`delay()`) in conveyor also costs one commit per task.",
        "- Per task, Huey's worker deletes the task when it takes it (at most once) and stores no",
        "  result for a task that returns None. conveyor leases the message, deletes it after the",
        "  task ran (at least once), and stores a result record for every task (STARTED, then",
        "  SUCCESS; one write when the task ends before the next round).",
        durability(results, variants),
        "- Huey's clock stops at the last task's `complete` signal, before its consumer stops;",
        "  conveyor's stops when its workers returned, after their last acks and result writes.",
        "",
        "RabbitMQ figures are in [benchmarks-rabbitmq.md](benchmarks-rabbitmq.md) (bulk enqueue",
        "against Dramatiq and Celery) and",
        "[benchmarks-rabbitmq-worker.md](benchmarks-rabbitmq-worker.md) (no-op tasks processed",
        "and idle memory, against Dramatiq and Celery prefork), written by `make bench` too.",
        "",
        "## All runs (tasks/s)",
        "",
        "| Workers | Peer | enqueue | processing |",
        "|---|---|---:|---:|",
    ]
    for variant in variants:
        for peer in PEERS:
            for run in results.runs[(variant, peer)]:
                lines.append(
                    f"| {VARIANT_LABELS[variant]} | {PEER_LABELS[peer]} | "
                    f"{run['enqueue_per_s']:,.0f} | {run['process_per_s']:,.0f} |"
                )
    return "\n".join(lines) + "\n"


def save(results: Results, args: argparse.Namespace, variants: list[str]) -> None:
    """The medians and ratios, for `bench.report`."""
    from bench import data

    data.save(
        "embedded",
        {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "tasks": args.tasks,
            "repeat": args.repeat,
            "command": "python -m bench.embedded " + shlex.join(sys.argv[1:]),
            "machine": machine(args),
            "versions": {peer: results.version(peer) for peer in PEERS},
            "target": TARGET,
            "variants": {
                variant: {
                    "label": VARIANT_LABELS[variant],
                    "median": {
                        peer: {f: results.median(variant, peer, f) for f in FIGURES}
                        for peer in PEERS
                    },
                    "ratio": {f: results.ratio(variant, f) for f in FIGURES},
                    "runs": {peer: results.runs[(variant, peer)] for peer in PEERS},
                }
                for variant in variants
            },
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [args.only] if args.only else list(VARIANTS)
    try:
        results = run_all(args)
    except BenchError as exc:
        console.print(f"[bold red]benchmark failed, no report written:[/] {exc}")
        return 1
    console.print(summary_table(results, variants))
    if not args.no_write:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(report(results, args, variants), encoding="utf-8")
        console.print(f"wrote {REPORT.relative_to(ROOT)}")
        save(results, args, variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
