"""What conveyor's default logging costs: throughput with it against `--quiet-tasks`, same run.

`python -m bench.logging_cost` (part of `make bench`, as `logging`) measures conveyor alone, in
pairs of runs that differ only in what the worker logs about finished tasks:

- default: INFO on stderr, as `conveyor worker` sets it up, with the default `task_log` (a line
  per task while at most 10 finish a second, then a summary every 5 s: docs/logging.md);
- quiet: the same with `--quiet-tasks` (`task_log="quiet"`): nothing about tasks that succeed.

Three variants, each through an existing scenario's runner, so the runs are the ones the other
reports time and verify:

- `embedded-threads`, `embedded-prefork`: `bench/conveyor_runner.py` (the embedded scenario's
  conveyor runner: an in-process `Worker` of 2 threads, or of 2 prefork children, draining N
  no-op tasks on the SQLite broker with results stored), with `--task-log quiet` for quiet;
- `rabbitmq-prefork`: `python -m bench.rabbitmq_worker --one conveyor` (the worker scenario's
  measurement: `conveyor worker --pool prefork -c 2 --until-empty` on the local RabbitMQ, no
  results), with `--quiet-tasks` added to the worker's command line for quiet.

Every round runs each variant default then quiet, or quiet then default (alternating by round,
so a drift in the machine's load favours neither). The figure per variant is the ratio of the
medians, default / quiet: 1.00 means logging costs nothing measurable; 0.97 means 3% fewer tasks
a second. Beside it: the median of each round's own ratio (its two runs were back to back, so a
change of the machine's load between rounds cancels out), and an estimate from the hot path
itself, `TaskLog.finished` timed in-process while summarizing and while quiet, times the rate.

Each run is verified by its runner (every task ran exactly once, nothing failed), and here too:
a default run must have logged at least one summary line and a quiet run no line about a
finished task, so a run that silently logged nothing cannot pass for a cheap one.

Writes docs/benchmarks-logging.md and docs/bench-data/logging.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import data
from bench.embedded import cpu_model

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks-logging.md"
VARIANTS = {
    "embedded-threads": "embedded SQLite, 2 threads",
    "embedded-prefork": "embedded SQLite, prefork, 2 children",
    "rabbitmq-prefork": "RabbitMQ, prefork, 2 children",
}
MODES = ("default", "quiet")
TIMEOUT_S = 600.0


class BenchError(Exception):
    """A run failed or did not check out."""


def command(variant: str, mode: str, tasks: int) -> list[str]:
    """The command of one run."""
    quiet = mode == "quiet"
    if variant.startswith("embedded"):
        kind = "thread" if variant == "embedded-threads" else "process"
        cmd = [sys.executable, str(ROOT / "bench" / "conveyor_runner.py"), "--tasks", str(tasks)]
        cmd += ["--workers", "2", "--worker-type", kind]
        return cmd + (["--task-log", "quiet"] if quiet else [])
    cmd = [sys.executable, "-m", "bench.rabbitmq_worker", "--one", "conveyor"]
    cmd += ["--measure", "throughput", "--tasks", str(tasks), "--conveyor-pool", "prefork"]
    return cmd + (["--conveyor-arg=--quiet-tasks"] if quiet else [])


def run(variant: str, mode: str, tasks: int) -> dict[str, Any]:
    """One run in a fresh interpreter: its tasks/s and what it logged about tasks."""
    cmd = command(variant, mode, tasks)
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{variant} ({mode}) did not finish within {TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"{variant} ({mode}) failed:\n{done.stderr.strip()[-3000:]}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{variant} ({mode}) printed no result:\n{done.stdout}") from None
    per_s = result.get("process_per_s", result.get("per_s"))
    logged = result.get("logged")
    if not isinstance(per_s, int | float) or not isinstance(logged, dict):
        raise BenchError(f"{variant} ({mode}): unexpected result {result}")
    if mode == "default" and logged["summaries"] < 1:
        raise BenchError(f"{variant}: the default run logged no summary: {logged}")
    if mode == "quiet" and (logged["summaries"] or logged["task_lines"]):
        raise BenchError(f"{variant}: the quiet run logged about tasks: {logged}")
    return {"per_s": float(per_s), "logged": logged}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks per run")
    parser.add_argument("--repeat", type=int, default=9, help="rounds; the report uses medians")
    parser.add_argument("--only", choices=tuple(VARIANTS), action="append", help="variant(s)")
    parser.add_argument("--no-write", action="store_true", help="print, write no report")
    args = parser.parse_args(argv)
    if args.tasks < 1000 or args.repeat < 1:
        parser.error("--tasks must be at least 1000 and --repeat at least 1")
    return args


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, Any]]]]:
    variants = args.only or list(VARIANTS)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {m: [] for m in MODES} for v in variants}
    for round_no in range(args.repeat):
        order = MODES if round_no % 2 == 0 else MODES[::-1]
        for variant in variants:
            for mode in order:
                result = run(variant, mode, args.tasks)
                runs[variant][mode].append(result)
                print(
                    f"round {round_no + 1}/{args.repeat}  {variant:<17} {mode:<8} "
                    f"{result['per_s']:>9,.0f} tasks/s  logged {result['logged']}",
                    flush=True,
                )
    return runs


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, float]]:
    """Per variant: the medians, their ratio, and the median of each round's own ratio (the
    two runs of a round ran one after the other, so a change in the machine's load between
    rounds cancels out of it)."""
    out = {}
    for variant, modes in runs.items():
        medians = {m: statistics.median(r["per_s"] for r in modes[m]) for m in MODES}
        pairs = [
            d["per_s"] / q["per_s"] for d, q in zip(modes["default"], modes["quiet"], strict=True)
        ]
        out[variant] = {
            **medians,
            "ratio": medians["default"] / medians["quiet"],
            "paired": statistics.median(pairs),
        }
    return out


def hot_path(repeat: int = 200_000) -> dict[str, float]:
    """Nanoseconds `TaskLog.finished` takes per task while summarizing, and while quiet, timed
    here in-process: the part of a task's cost that logging adds, without the noise of whole
    runs."""
    import logging
    import timeit

    from conveyor.worker.tasklog import LINES_PER_S, TaskLog

    logger = logging.getLogger("conveyor.worker.tasklog")
    logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    out = {}
    for mode in ("auto", "quiet"):
        task_log = TaskLog("auto" if mode == "auto" else "quiet")
        for _ in range(LINES_PER_S + 1):  # past the per-task lines: summarizing
            task_log.finished("bench.noop", "0" * 32, "succeeded", 1e-5)
        best = min(
            timeit.repeat(
                lambda t=task_log: t.finished("bench.noop", "0" * 32, "succeeded", 1e-5),
                number=repeat,
                repeat=5,
            )
        )
        out[mode] = best / repeat * 1e9
    return {"summarizing_ns": out["auto"], "quiet_ns": out["quiet"]}


def report(
    args: argparse.Namespace, runs: dict[str, Any], figures: dict[str, Any], hot: dict[str, float]
) -> str:
    load = os.getloadavg()
    extra_ns = hot["summarizing_ns"] - hot["quiet_ns"]
    rows = [
        f"| {VARIANTS[v]} | {f['default']:,.0f} | {f['quiet']:,.0f} | {f['ratio']:.3f} | "
        f"{f['paired']:.3f} | {extra_ns * f['quiet'] / 1e7:.2f}% |"
        for v, f in figures.items()
    ]
    spread = []
    for variant, modes in runs.items():
        for mode in MODES:
            values = ", ".join(f"{r['per_s']:,.0f}" for r in modes[mode])
            spread.append(f"- {VARIANTS[variant]}, {mode}: {values}")
    return "\n".join(
        [
            "# Benchmark: what default logging costs",
            "",
            "Generated by `python -m bench.logging_cost` (its docstring gives the method); do",
            "not edit by hand. conveyor's default logging (a line per task while at most 10",
            "finish a second, then a summary every 5 s) against `--quiet-tasks`, in the same",
            "run, runs alternating. See [Logging](logging.md).",
            "",
            f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; Python {sys.version.split()[0]}",
            f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            f"- {args.tasks:,} no-op tasks per run, {args.repeat} rounds",
            "",
            "| Worker | default, tasks/s | --quiet-tasks, tasks/s | default / quiet, medians "
            "| default / quiet, median of rounds | hot path, estimated |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "- *default / quiet, medians*: the ratio of the medians of the rounds' rates.",
            "- *median of rounds*: the median of each round's own ratio; its two runs ran one",
            "  after the other, so a change of the machine's load between rounds cancels out.",
            f"- *hot path*: `TaskLog.finished` takes {hot['summarizing_ns']:,.0f} ns a task while",
            f"  summarizing and {hot['quiet_ns']:,.0f} ns with `--quiet-tasks` (timed in-process,",
            "  best of 5); the difference times the quiet rate is the share of the worker's time",
            "  the default adds. On a machine with other load, whole runs vary by more than that",
            "  from one to the next; read the ratios together with this estimate.",
            "",
            "Every run, in order:",
            "",
            *spread,
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = measure(args)
    except BenchError as exc:
        print(f"benchmark failed, no report written:\n{exc}", file=sys.stderr)
        return 1
    figures = summarize(runs)
    hot = hot_path()
    for variant, f in figures.items():
        print(
            f"{VARIANTS[variant]:<40} default/quiet: medians {f['ratio']:.3f}, "
            f"rounds {f['paired']:.3f}"
        )
    print(f"hot path: {hot['summarizing_ns']:.0f} ns summarizing, {hot['quiet_ns']:.0f} ns quiet")
    if not args.no_write:
        text = report(args, runs, figures, hot)
        REPORT.write_text(text)
        payload = {"tasks": args.tasks, "repeat": args.repeat, "labels": VARIANTS, "hot_path": hot}
        data.save("logging", {**payload, "figures": figures, "runs": runs})
        print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
