"""What the worker says about finished tasks at INFO: a line each while few, a summary while many.

The policy (the default, `auto`):

- While at most `LINES_PER_S` (10) tasks finish within a second, each success gets its own line:
  `task shop.resize[<id>] succeeded in 3.21ms`. Failures, retries and lost tasks have lines of
  their own already (the consumer logs them), so they get none here.
- The task that makes it more than 10 in a second switches to summaries: from then on, nothing
  is logged per success, and every `SUMMARY_EVERY_S` (5 s) one line gives the counts and rates
  per task name and outcome (succeeded, failed, retried, lost) of that interval.
- After an interval that averaged under half of `LINES_PER_S` (5 a second), per-task lines come
  back. The half is hysteresis: a worker near the threshold settles on summaries instead of
  switching at every burst.

`each` logs every success (`--log-each-task`) and `quiet` neither lines nor summaries
(`--quiet-tasks`); failures, retries and lost tasks are logged whatever the mode.

Cost: 10 lines a second is negligible, and a task counted into a summary costs a clock read and a
dict update under the consumer's lock (measured in bench/logging_cost.py). The lines go to the
`conveyor.worker.tasklog` logger, so setting its level to WARNING silences them too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("conveyor.worker.tasklog")

TaskLogMode = Literal["auto", "each", "quiet"]
LINES_PER_S = 10
SUMMARY_EVERY_S = 5.0
#: Task names listed in a summary, the busiest first; the rest are counted together.
SUMMARY_NAMES = 10
OUTCOMES = ("succeeded", "failed", "retried", "lost", "revoked")


class TaskLog:
    """Logs finished tasks by the policy above. Not thread-safe: the consumer calls it under its
    lock, from whichever thread settles a task, and calls `tick` from its loop."""

    def __init__(
        self, mode: TaskLogMode = "auto", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.mode = mode
        self._clock = clock
        self._summarizing = False
        self._second = -1.0  # when the current one-second window of per-task lines began
        self._lines = 0  # tasks finished in that window
        self._since = 0.0  # when the current summary interval began
        self._counts: dict[tuple[str, str], int] = {}  # (task name, outcome) -> count

    def finished(self, name: str, task_id: str, outcome: str, took: float) -> None:
        """Note a finished task: `outcome` is one of `OUTCOMES`, `took` its run time in
        seconds."""
        if self._summarizing:
            # The hot path while many finish: a clock read and a count. Whether INFO is still
            # on is asked once per interval, in `_summarize`, not for every task.
            now = self._clock()
            if now - self._since >= SUMMARY_EVERY_S:
                self._summarize(now)
            if self._summarizing:
                key = (name, outcome)
                self._counts[key] = self._counts.get(key, 0) + 1
                return
            # The interval was quiet: back to lines, starting with this task.
        mode = self.mode
        if mode == "quiet" or not log.isEnabledFor(logging.INFO):
            return
        if mode == "each":
            if outcome == "succeeded":
                _succeeded(name, task_id, took)
            return
        now = self._clock()
        if now - self._second >= 1.0:
            self._second, self._lines = now, 0
        self._lines += 1
        if self._lines <= LINES_PER_S:
            if outcome == "succeeded":
                _succeeded(name, task_id, took)
            return
        self._summarizing, self._since = True, now
        self._counts[(name, outcome)] = 1

    def tick(self) -> None:
        """Log the summary if its interval is over (the consumer calls this every second, so a
        summary comes out even when no task finishes after it)."""
        if self._summarizing and self._clock() - self._since >= SUMMARY_EVERY_S:
            self._summarize(self._clock())

    def flush(self) -> None:
        """Log what the current summary holds so far (at shutdown)."""
        if self._summarizing:
            self._summarize(self._clock())

    def _summarize(self, now: float) -> None:
        """Log the interval's summary, and start the next interval or go back to lines."""
        counts, self._counts = self._counts, {}
        elapsed = max(now - self._since, 1e-3)
        self._since = now
        total = sum(counts.values())
        enabled = log.isEnabledFor(logging.INFO)
        if total / elapsed < LINES_PER_S / 2 or not enabled:
            self._summarizing, self._second, self._lines = False, -1.0, 0
        if total == 0 or not enabled:
            return
        by_name: dict[str, dict[str, int]] = {}
        for (name, outcome), count in counts.items():
            by_name.setdefault(name, {})[outcome] = count
        busiest = sorted(by_name.items(), key=lambda item: -sum(item[1].values()))
        parts = [
            f"{name}: "
            + ", ".join(
                f"{n:,} {outcome} ({_rate(n / elapsed)})"
                for outcome in OUTCOMES
                if (n := outcomes.get(outcome, 0))
            )
            for name, outcomes in busiest[:SUMMARY_NAMES]
        ]
        rest = busiest[SUMMARY_NAMES:]
        if rest:
            others = sum(sum(outcomes.values()) for _, outcomes in rest)
            parts.append(f"{len(rest)} more tasks: {others:,} finished ({_rate(others / elapsed)})")
        log.info(
            "%s tasks finished in the last %.1fs (%s); %s",
            f"{total:,}",
            elapsed,
            _rate(total / elapsed),
            "; ".join(parts),
        )


def _succeeded(name: str, task_id: str, took: float) -> None:
    # The fields too, for a JSON formatter (docs/logging.md): the line is not logged inside the
    # task, so `TaskContext` would find no task to add.
    fields = {
        "task_name": name,
        "task_id": task_id,
        "task_outcome": "succeeded",
        "task_runtime": took,
    }
    log.info("task %s[%s] succeeded in %s", name, task_id, _duration(took), extra=fields)


def _rate(per_s: float) -> str:
    return f"{per_s:,.0f}/s" if per_s >= 10 else f"{per_s:.1f}/s"


def _duration(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.2f}ms"
    return f"{seconds:.2f}s"
