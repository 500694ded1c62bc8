"""Middleware and tasks shared by the middleware tests, on the memory broker and the real ones.

`Recorder` notes every hook call as one JSON line in a file (one write in append mode, so the
lines of a prefork child and of the worker never interleave): the test reads what ran where,
whichever process ran it. `Exploding` raises in every hook but `before_send`, after noting it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from conveyor import Conveyor, Request, Task
from conveyor.message import Envelope
from conveyor.middleware import Middleware, RunOutcome, Settled
from conveyor.worker import Worker

Note = dict[str, Any]


def note(path: Path, hook: str, **fields: Any) -> None:
    """Append one line to the ledger file at `path`."""
    line = json.dumps({"hook": hook, "pid": os.getpid(), **fields}, default=repr) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: Path) -> list[Note]:
    """Every line noted so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


class Recorder(Middleware):
    """Notes each hook call; `before_send` adds a `traceparent` header as a tracer would."""

    def __init__(self, path: Path, label: str = "recorder") -> None:
        self.path = path
        self.label = label

    def _note(self, hook: str, **fields: Any) -> None:
        note(self.path, hook, by=self.label, **fields)

    def before_send(self, envelope: Envelope, headers: dict[str, str]) -> None:
        headers["traceparent"] = f"00-{envelope.id}-01"
        self._note("before_send", id=envelope.id, task=envelope.task)

    def process_start(self) -> None:
        self._note("process_start")

    def worker_start(self, worker: Worker) -> None:
        self._note("worker_start", pool=worker.pool_name)

    def before_admit(self, task: Task[Any, Any], request: Request) -> None:
        self._note("before_admit", id=request.id, task=task.name)

    def before_run(self, task: Task[Any, Any], request: Request) -> None:
        self._note(
            "before_run",
            id=request.id,
            task=task.name,
            traceparent=request.headers.get("traceparent"),
            retries=request.retries,
        )

    def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
        exc = outcome.exception
        self._note(
            "after_run",
            id=request.id,
            task=task.name,
            state=outcome.state,
            result=outcome.result,
            exception=None if exc is None else type(exc).__name__,
        )

    def after_settle(self, settled: Settled) -> None:
        env = settled.envelope
        self._note(
            "after_settle",
            id=None if env is None else env.id,
            task=None if settled.task is None else settled.task.name,
            outcome=settled.outcome,
            error_type=settled.error_type,
            dead_letter=settled.dead_letter,
            ran=settled.took is not None,
        )

    def worker_stop(self, worker: Worker) -> None:
        self._note("worker_stop")


class Exploding(Middleware):
    """Raises in every hook it runs, after noting that it ran (`before_send` is left alone:
    its exception would reach the sender, by design)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _boom(self, hook: str) -> None:
        note(self.path, hook, by="exploding")
        raise RuntimeError(f"exploding in {hook}")

    def process_start(self) -> None:
        self._boom("process_start")

    def worker_start(self, worker: Worker) -> None:
        self._boom("worker_start")

    def before_admit(self, task: Task[Any, Any], request: Request) -> None:
        self._boom("before_admit")

    def before_run(self, task: Task[Any, Any], request: Request) -> None:
        self._boom("before_run")

    def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
        self._boom("after_run")

    def after_settle(self, settled: Settled) -> None:
        self._boom("after_settle")

    def worker_stop(self, worker: Worker) -> None:
        self._boom("worker_stop")


class Scenario:
    """Three tasks that meet every outcome: one succeeds, one fails, one retries then succeeds.

    `send()` sends one of each (and an async one) and returns their ids by name.
    """

    def __init__(self, app: Conveyor) -> None:
        @app.task(bind=True, time_limit=30, soft_time_limit=20, priority=3)
        def double(self: Task[Any, Any], x: int) -> int:
            return x * 2

        @app.task
        def boom() -> None:
            raise ValueError("boom")

        @app.task(bind=True, max_retries=2)
        def flaky(self: Task[Any, Any]) -> str:
            if self.request.retries == 0:
                raise self.retry(countdown=0, exc=ConnectionError("once"))
            return "done"

        @app.task
        async def echo(x: str) -> str:
            return x

        self.tasks: dict[str, Task[Any, Any]] = {
            "double": double,
            "boom": boom,
            "flaky": flaky,
            "echo": echo,
        }

    def send(self) -> dict[str, str]:
        t = self.tasks
        return {
            "double": t["double"].delay(21).id,
            "boom": t["boom"].delay().id,
            "flaky": t["flaky"].delay().id,
            "echo": t["echo"].delay("hi").id,
        }


def by_hook(notes: list[Note], label: str = "recorder") -> dict[str, list[Note]]:
    """The notes of one middleware, by hook."""
    out: dict[str, list[Note]] = {}
    for n in notes:
        if n.get("by") == label:
            out.setdefault(n["hook"], []).append(n)
    return out


def check_scenario(
    notes: list[Note], ids: dict[str, str], *, prefork: bool, label: str = "recorder"
) -> None:
    """Assert that every hook ran, once per event, in the process it belongs to."""
    here = os.getpid()
    hooks = by_hook(notes, label)
    names = {v: k for k, v in ids.items()}

    def per_id(hook: str) -> Counter[str]:
        return Counter(names[n["id"]] for n in hooks.get(hook, []) if n["id"] in names)

    assert per_id("before_send") == Counter(list(ids)), "one before_send per send, not per retry"
    assert all(n["pid"] == here for n in hooks["before_send"])
    expected_runs = Counter({"double": 1, "boom": 1, "flaky": 2, "echo": 1})
    assert per_id("before_admit") == expected_runs
    assert per_id("before_run") == expected_runs
    assert per_id("after_run") == expected_runs
    assert per_id("after_settle") == expected_runs
    # Where each ran: the worker runs in this process; tasks in its children with prefork.
    for hook in ("before_admit", "after_settle", "worker_start", "worker_stop"):
        assert {n["pid"] for n in hooks[hook]} == {here}, hook
    run_pids = {n["pid"] for n in hooks["before_run"] + hooks["after_run"]}
    assert (here not in run_pids) if prefork else (run_pids == {here})
    assert len(hooks["worker_start"]) == 1 and len(hooks["worker_stop"]) == 1
    started = {n["pid"] for n in hooks["process_start"]}
    assert run_pids <= started, "every process that ran a task started its middleware"
    # What each saw: the header before_send added, and how each run ended.
    assert {n["traceparent"] for n in hooks["before_run"]} == {
        f"00-{n['id']}-01" for n in hooks["before_run"]
    }
    runs = {(names[n["id"]], n["state"], n["exception"]) for n in hooks["after_run"]}
    assert runs == {
        ("double", "success", None),
        ("boom", "failure", "ValueError"),
        ("flaky", "retry", "ConnectionError"),
        ("flaky", "success", None),
        ("echo", "success", None),
    }
    assert [n["result"] for n in hooks["after_run"] if names[n["id"]] == "double"] == [42]
    settled = {
        (names[n["id"]], n["outcome"], n["error_type"], n["ran"]) for n in hooks["after_settle"]
    }
    assert settled == {
        ("double", "succeeded", None, True),
        ("boom", "failed", "ValueError", True),
        ("flaky", "retried", "ConnectionError", True),
        ("flaky", "succeeded", None, True),
        ("echo", "succeeded", None, True),
    }
