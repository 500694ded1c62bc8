"""Every benchmark scenario, then the report: `python -m bench` (what `make bench` runs).

Each scenario is a module of its own, run here as a subprocess with its defaults (or the
arguments given after its name), side by side with its peers in the same run on the same local
services. Each writes its detailed report (`docs/benchmarks-*.md`) and its figures
(`docs/bench-data/*.json`); `bench.report` then writes the summary, `docs/benchmarks.md`, and the
charts in `docs/img/` from those figures.

    python -m bench                      every scenario, then the report
    python -m bench SCENARIO [ARGS...]   one scenario (ARGS go to it), then the report
    python -m bench report               the report only, from the saved figures

A scenario that fails (a lost or doubled task, a peer that did not stop cleanly) writes no
figures; the others still run, the report keeps that scenario's previous figures and says when
they were taken, and this command exits non-zero.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

from bench.embedded import cpu_model

__all__ = ["SCENARIOS", "cpu_model", "main"]

#: Scenario name -> (module, what it measures), in the order `make bench` runs them.
SCENARIOS = {
    "embedded": ("bench.embedded", "throughput on the embedded SQLite broker, against Huey"),
    "enqueue": ("bench.rabbitmq_enqueue", "bulk enqueue on RabbitMQ, with and without confirms"),
    "worker": ("bench.rabbitmq_worker", "processing rate and idle memory on RabbitMQ"),
    "latency": ("bench.latency", "enqueue-to-start and enqueue-to-result, one task at a time"),
    "scaling": ("bench.scaling", "rate against concurrency, and a 1,000,000-message backlog"),
    "load_memory": ("bench.load_memory", "worker memory idle and after 100,000 tasks"),
    "mix": ("bench.mix", "1% of tasks sleep 1 s: do short tasks wait behind them?"),
    "short_tasks": ("bench.short_tasks", "2 ms tasks, 4 children: is the next task at hand?"),
    "results": ("bench.results_roundtrip", "result round trips for every result store"),
    "values": ("bench.values", "what the checks that keep values exact cost per send and run"),
    "logging": ("bench.logging_cost", "conveyor's default logging against --quiet-tasks"),
    "chord": ("bench.chord", "a 10,000-member chord from send to callback, against Celery"),
}


def run(module: str, args: Sequence[str]) -> int:
    """Run one scenario module in a fresh interpreter; its exit status."""
    print(f"\n=== python -m {module} {' '.join(args)}".rstrip(), flush=True)
    started = time.monotonic()
    status = subprocess.call([sys.executable, "-m", module, *args])
    print(f"=== {module}: exit {status} after {time.monotonic() - started:,.0f}s", flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["report"]:
        return run("bench.report", args[1:])
    if args and args[0] in SCENARIOS:
        chosen = {args[0]: args[1:]}
    elif args:
        names = ", ".join(SCENARIOS)
        print(f"unknown scenario {args[0]!r}: choose one of {names}, or report", file=sys.stderr)
        return 2
    else:
        chosen = {name: [] for name in SCENARIOS}
    started = time.monotonic()
    failed = [name for name, extra in chosen.items() if run(SCENARIOS[name][0], extra) != 0]
    elapsed = [f"--elapsed={time.monotonic() - started:.0f}"] if not args else []
    report = run("bench.report", elapsed)
    if failed:
        print(f"failed scenarios (their previous figures are kept): {', '.join(failed)}")
    return 1 if failed or report != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
