"""How `conveyor events` and `conveyor inspect` show what they got: rich text for people, one
JSON document per line for scripts. Everything from a worker is shown as `Text`, never read as
markup."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec

from conveyor.control.events import Event, TaskEvent, WorkerEvent

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from conveyor.control.client import InspectResult
    from conveyor.control.protocol import WorkerReport

_STYLES = {
    "task-succeeded": "green",
    "task-failed": "red",
    "task-dead-lettered": "bold red",
    "task-retried": "yellow",
    "task-revoked": "magenta",
    "task-lost": "red",
    "task-expired": "yellow",
    "task-skipped": "yellow",
    "task-rejected": "red",
}


def event_json(event: Event) -> str:
    """One event as one line of JSON."""
    return msgspec.json.encode(event).decode()


def event_line(event: Event) -> Text:
    """One event as one line of text."""
    from rich.text import Text

    stamp = (
        time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time % 1 * 1000):03d}"
    )
    line = Text(f"{stamp}  ")
    line.append(event.worker, style="dim")
    line.append("  ")
    if isinstance(event, WorkerEvent):
        line.append(event.type, style="cyan")
        line.append(
            f"  {event.pool} x{event.concurrency}, {event.running} running, "
            f"{event.processed:,} processed, load {event.load[0]:.2f}"
        )
        if event.dropped:
            line.append(f", {event.dropped:,} events dropped", style="yellow")
        return line
    line.append(event.type, style=_STYLES.get(event.type, ""))
    line.append(f"  {event.task or '?'}[{event.id or '?'}]")
    line.append(_details(event))
    return line


def _details(event: TaskEvent) -> str:
    parts = []
    if event.retries:
        parts.append(f"try {event.retries + 1}")
    if event.runtime is not None:
        parts.append(f"in {event.runtime * 1000:.2f}ms")
    if event.error_type is not None:
        parts.append(f"{event.error_type}: {event.error_message or ''}")
    if event.reason is not None and event.reason != event.error_message:
        parts.append(event.reason)
    return "  " + ", ".join(parts) if parts else ""


def inspect_json(result: InspectResult) -> str:
    """The whole answer as one JSON document: `workers` (their reports) and `silent`."""
    return msgspec.json.encode({"workers": result.reports, "silent": result.silent}).decode()


def show_inspection(console: Console, app: str, result: InspectResult, timeout: float) -> None:
    """A table of the workers, then each worker's tasks, then a line per silent worker."""
    from rich.table import Table
    from rich.text import Text

    if not result.reports and not result.silent:
        console.print(Text(f"no worker of {app} is running (none registered, none answered)"))
        return
    if result.reports:
        table = Table(title=f"workers of {app}")
        for column in ("worker", "pool", "running", "reserved", "succeeded", "failed"):
            table.add_column(column, justify="left" if column in ("worker", "pool") else "right")
        for column in ("retried", "uptime", "broker"):
            table.add_column(column, justify="right" if column != "broker" else "left")
        for r in result.reports:
            s = r.stats
            table.add_row(
                Text(r.worker),
                f"{r.pool} x{r.concurrency}",
                f"{len(r.active):,}",
                f"{len(r.reserved):,}",
                f"{s.get('succeeded', 0):,}",
                f"{s.get('failed', 0):,}",
                f"{s.get('retried', 0):,}",
                _duration(r.uptime),
                Text(r.broker),
            )
        console.print(table)
    for r in result.reports:
        _show_worker(console, r)
    for silent in result.silent:
        ago = time.time() - silent.last_seen
        console.print(
            Text(
                f"worker {silent.worker} (pid {silent.pid}) did not answer within {timeout:g}s; "
                f"its last heartbeat was {ago:.1f}s ago",
                style="bold yellow",
            )
        )


def _show_worker(console: Console, report: WorkerReport) -> None:
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    title = (
        f"{report.worker}: {report.pool} x{report.concurrency}, queues {', '.join(report.queues)}"
    )
    if report.busy:
        title += " (its event loop is busy: processes and reserved messages unknown)"
    active = Table(title=title, title_justify="left")
    for column in ("active task", "id", "since", "pid"):
        active.add_column(column, overflow="fold")
    for task in report.active:
        since = f"{now - task.since:.1f}s ago"
        pid = "-" if task.pid is None else str(task.pid)
        active.add_row(Text(task.task), Text(task.id), since, pid)
    if not report.active:
        active.add_row("(none)", "", "", "")
    console.print(active)
    if report.reserved:
        reserved = Table()
        for column in ("reserved task", "id", "where"):
            reserved.add_column(column, overflow="fold")
        for held in report.reserved:
            reserved.add_row(Text(held.task or "?"), Text(held.id or "?"), Text(held.where))
        console.print(reserved)
    names = Text("registered: ", style="dim")
    names.append(", ".join(report.registered) or "(none)")
    console.print(names)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
