"""The `conveyor` command: argument parsing, and presenting what the library returns."""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click
import msgspec

from conveyor import log
from conveyor.app import Conveyor, load_app, origin_outside_cwd
from conveyor.brokers.base import DeadLetter
from conveyor.errors import ConveyorError
from conveyor.redact import redact_text, redact_url
from conveyor.settings import LOG_LEVELS, parse_size
from conveyor.worker.loops import LOOPS
from conveyor.worker.pools import POOLS, check_concurrency

if TYPE_CHECKING:
    from rich.table import Table

    from conveyor.deadletters import Described
    from conveyor.scheduler import Scheduler

P = ParamSpec("P")
R = TypeVar("R")
#: Dead letters from which `requeue` shows a progress bar.
PROGRESS_FROM = 200


def _clear_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Our errors become one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConveyorError as exc:
            raise click.ClickException(redact_text(str(exc))) from None

    return wrapper


def _load_app(path: str) -> Conveyor:
    """`load_app`, saying on stderr when the module came from outside the current directory.

    A line on stderr rather than a log record: `send`, `status` and `purge` set up no logging,
    the line must show at any `--loglevel`, and stdout stays for what scripts read (the task id
    `send` prints). It names the file because a same-named module in another project (an
    editable install's source tree, PYTHONPATH) means another `conveyor.db` and another queue.
    """
    app = load_app(path)
    origin = origin_outside_cwd(app)
    if origin is not None:
        click.echo(
            f"conveyor: {path} is loaded from {origin}, outside the current directory "
            f"{os.getcwd()}",
            err=True,
        )
    return app


class _Size(click.ParamType[int, Any]):
    """A memory size: 200MB, 1.5GiB, 300M (binary), or plain bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc))


@click.group()
@click.version_option(package_name="conveyor")
def main() -> None:
    """conveyor: a distributed task queue. APP is module:attribute, e.g. shop.tasks:app."""


@main.command()
@click.argument("app_path", metavar="APP")
@click.option("--pool", "-P", type=click.Choice(POOLS), help="Pool (default: the app's setting).")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="Tasks run at once.")
@click.option("--queues", "-Q", help="Comma-separated queues to consume.")
@click.option("--until-empty", is_flag=True, help="Exit once the queues are empty.")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), help="Seconds for warm shutdown.")
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    help="prefork: replace a child with a fresh one after this many tasks.",
)
@click.option(
    "--max-memory-per-child",
    type=_Size(),
    help="prefork: replace a child after a task leaves it above this size (200MB, 1GiB).",
)
@click.option(
    "--loop",
    type=click.Choice(LOOPS),
    help="The worker's event loop: uvloop (conveyor[uvloop]) or asyncio; auto, uvloop when "
    "installed (default: the app's loop setting, auto).",
)
@click.option(
    "--loglevel",
    "-l",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Log level (default: the app's log_level, INFO).",
)
@click.option(
    "--log-config",
    metavar="PATH",
    help="A logging.config.dictConfig dictionary as JSON, instead of conveyor's logging.",
)
@click.option(
    "--log-each-task", is_flag=True, help="Log a line for every task that succeeds, however many."
)
@click.option(
    "--quiet-tasks", is_flag=True, help="Log nothing about tasks that succeed (failures still)."
)
@click.option(
    "--events",
    "with_events",
    is_flag=True,
    default=None,
    help="Publish task events and heartbeats all the time, not only while `conveyor events` "
    "runs (default: the app's events setting).",
)
@click.option(
    "--scheduler",
    "with_scheduler",
    is_flag=True,
    help="Also send APP's periodic tasks (any number of schedulers may run).",
)
@_clear_errors
def worker(
    app_path: str,
    pool: str | None,
    concurrency: int | None,
    queues: str | None,
    until_empty: bool,
    shutdown_grace: float | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    loop: str | None,
    loglevel: str | None,
    log_config: str | None,
    log_each_task: bool,
    quiet_tasks: bool,
    with_events: bool | None,
    with_scheduler: bool,
) -> None:
    """Run a worker for APP.

    At INFO it logs a line for each task that succeeds while at most 10 finish a second, and a
    summary every 5 s above that (docs/logging.md).
    """
    from conveyor.worker import Worker

    if log_each_task and quiet_tasks:
        raise click.UsageError("--log-each-task and --quiet-tasks exclude each other: choose one")
    app = _load_app(app_path)
    if concurrency is not None:
        check_concurrency(pool or app.settings.pool, concurrency)
    # After the import: handlers the app's module put on the root logger are the user's choice.
    log.setup(
        loglevel or app.settings.log_level, config=log_config, level_given=loglevel is not None
    )
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    running = Worker(
        app,
        queues=names,
        pool=pool,
        concurrency=concurrency,
        until_empty=until_empty,
        shutdown_grace=shutdown_grace,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=max_memory_per_child,
        task_log="each" if log_each_task else "quiet" if quiet_tasks else None,
        loop=loop,
        events=with_events,
    )
    scheduler = _start_scheduler(app, running.started) if with_scheduler else None
    try:
        running.run()
    finally:
        if scheduler is not None:
            scheduler.stop()
    if running.failure is not None:
        # A supervisor (systemd, Kubernetes) restarts a worker that exits with an error.
        raise click.ClickException(f"the worker stopped: {running.failure}")


@main.command()
@click.argument("app_path", metavar="APP")
@click.argument("task_name", metavar="TASK")
@click.argument("args", nargs=-1)
@click.option("--kwargs", "kwargs_json", help='Keyword arguments as a JSON object: {"x": 1}.')
@click.option("--countdown", type=click.FloatRange(min=0), help="Run no sooner than in S seconds.")
@click.option("--queue", help="Send to this queue instead of the task's own.")
@click.option("--priority", type=click.IntRange(0, 9), help="0 to 9, higher runs first.")
@click.option("--wait", type=click.FloatRange(min=0), help="Wait up to S seconds for the result.")
@_clear_errors
def send(
    app_path: str,
    task_name: str,
    args: tuple[str, ...],
    kwargs_json: str | None,
    countdown: float | None,
    queue: str | None,
    priority: int | None,
    wait: float | None,
) -> None:
    """Send TASK with ARGS, each a JSON value: conveyor send shop:app shop.resize '"a.png"' 100."""
    if wait is not None and not math.isfinite(wait):
        raise click.ClickException("--wait takes a number of seconds")
    app = _load_app(app_path)
    task = app.get_task(task_name)
    if wait is not None and (app.results is None or task.options.ignore_result):
        # Refuse before sending: retrying the command would otherwise send the task twice.
        raise click.ClickException(
            f"--wait needs a stored result, but {task.name} stores none (no result store, or "
            "ignore_result=True); send without --wait"
        )
    values = [_json(arg, f"argument {n}") for n, arg in enumerate(args, 1)]
    kwargs = _json(kwargs_json, "--kwargs") if kwargs_json else {}
    if not isinstance(kwargs, dict):
        raise click.ClickException('--kwargs must be a JSON object, e.g. {"width": 100}')
    result = task.apply_async(values, kwargs, countdown=countdown, queue=queue, priority=priority)
    click.echo(result.id)
    if wait is not None:
        click.echo(msgspec.json.encode(result.get(timeout=wait)).decode())


def _start_scheduler(app: Conveyor, started: threading.Event) -> Scheduler:
    """A scheduler on a thread of its own, beside the worker, once the worker has started.

    Made now, so that a schedule of an unknown task stops the command before the worker starts;
    run only once the pool is up, because the worker forks its zygote at start and a thread
    that holds a lock (logging's, a database's) at a fork leaves it held in the child.
    """
    from conveyor.scheduler import Scheduler

    scheduler = Scheduler(app)

    def run() -> None:
        if started.wait() and not scheduler.stopped:
            scheduler.run()

    threading.Thread(target=run, name="conveyor-scheduler", daemon=True).start()
    return scheduler


@main.command()
@click.argument("app_path", metavar="APP")
@click.option("--loglevel", "-l", type=click.Choice(LOG_LEVELS, case_sensitive=False))
@click.option(
    "--lease",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a claimed tick waits for its scheduler before another one sends it.",
)
@_clear_errors
def scheduler(app_path: str, loglevel: str | None, lease: float) -> None:
    """Send APP's periodic tasks: each tick once, however many schedulers run."""
    import signal

    from conveyor.scheduler import Scheduler

    app = _load_app(app_path)
    log.setup(loglevel or app.settings.log_level, level_given=loglevel is not None)
    if not app.schedules:
        raise click.ClickException(
            f"{app_path} declares no schedules: add @app.periodic(...) or app.schedule(...)"
        )
    running = Scheduler(app, lease=lease)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: running.stop())
    try:
        running.run()
    finally:
        running.close()
        app.close()


@main.command()
@click.argument("app_path", metavar="APP")
@_clear_errors
def schedule(app_path: str) -> None:
    """List APP's schedules: when each ticks next, its last tick and who sent it."""
    import datetime as dt

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from conveyor.scheduler.claims import from_url
    from conveyor.scheduler.runner import store_url

    app = _load_app(app_path)
    claims = from_url(store_url(app))
    now = dt.datetime.now(dt.UTC)
    table = Table(title=f"{app.name}: schedules, claims in {claims.display_url}")
    for column in ("schedule", "task", "when", "next tick", "last tick", "sent by"):
        table.add_column(column)
    try:
        for entry in app.schedules.values():
            zone = entry.zone
            upcoming = next(entry.ticks(now)).astimezone(zone)
            last = claims.last(entry.name)
            if last is None:
                previous, by = "never", "-"
            else:
                previous = last.tick.astimezone(zone).isoformat(sep=" ", timespec="seconds")
                by = last.owner if last.sent else f"{last.owner} (claimed, not sent yet)"
            table.add_row(
                Text(entry.name),
                Text(entry.task),
                Text(entry.what),
                upcoming.isoformat(sep=" ", timespec="seconds"),
                previous,
                Text(by),
            )
    finally:
        claims.close()
    Console().print(table)


@main.command()
@click.argument("app_path", metavar="APP")
@_clear_errors
def status(app_path: str) -> None:
    """Show APP's queues: ready, delayed, in flight and dead-lettered messages."""
    app = _load_app(app_path)
    from rich.console import Console  # here, not at the top: a worker never loads rich
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title=f"{app.name} on {redact_url(app.broker.display_url)}")
    for column in ("queue", "ready", "delayed", "in flight", "dead-lettered"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for s in app.broker.stats(_queues(app)):
        counts = (f"{n:,}" for n in (s.ready, s.delayed, s.in_flight, s.dead))
        table.add_row(Text(s.queue), *counts)  # Text: a queue name is never read as markup
    console.print(table)
    store = app.results
    results = Table(title="results")
    results.add_column("store")
    results.add_column("kept", justify="right")
    if store is None:
        results.add_row("none (results are not stored)", "-")
    else:
        results.add_row(Text(redact_url(store.display_url)), f"{store.count():,}")
    console.print(results)


@main.command()
@click.argument("app_path", metavar="APP")
@click.option("--queue", "-Q", required=True, help="The queue to empty.")
@click.option("--dead", is_flag=True, help="Delete the queue's dead letters instead.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_clear_errors
def purge(app_path: str, queue: str, dead: bool, yes: bool) -> None:
    """Delete every waiting message of a queue (messages being run are left alone)."""
    app = _load_app(app_path)
    _check_queue(app, queue)
    what = f"the dead letters of {queue!r}" if dead else f"every waiting message in {queue!r}"
    if not yes:
        click.confirm(f"Delete {what}?", abort=True)
    count = app.broker.purge(queue, dead=dead)
    noun = "message" if count == 1 else "messages"
    click.echo(f"purged {count:,} {noun} from {queue}{' (dead letters)' if dead else ''}")


@main.command("dead-letters")
@click.argument("app_path", metavar="APP")
@click.option("--queue", "-Q", help="Only this queue (default: every queue of the app).")
@click.option("--reason", help="Only dead letters whose reason contains TEXT (any case).")
@click.option(
    "--limit",
    "-n",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Show at most N, newest first.",
)
@_clear_errors
def dead_letters(app_path: str, queue: str | None, reason: str | None, limit: int) -> None:
    """List dead letters with their reasons: queue, time, deliveries, task name and id."""
    from rich.console import Console

    from conveyor.deadletters import Selection, describe

    app = _load_app(app_path)
    if queue is not None:
        _check_queue(app, queue)
    names = [queue] if queue is not None else _queues(app)
    dead = {s.queue: s.dead for s in app.broker.stats(names)}
    selection = Selection(reason)
    letters = []
    for name in names:
        if dead.get(name):
            # A filter must look at every dead letter; without one the newest `limit` do.
            wanted = limit if selection.everything else dead[name]
            letters += [d for d in app.broker.dead_letters(name, wanted) if selection(d)]
    total = sum(dead.values()) if selection.everything else len(letters)
    where = ", ".join(names)
    if not letters:
        matching = f" with a reason containing {reason!r}" if reason else ""
        click.echo(f"no dead letters{matching} in {where}")
        return
    letters.sort(key=lambda d: d.died_at, reverse=True)
    shown = [describe(d) for d in letters[:limit]]
    table = _dead_letter_table(shown)
    table.title = f"dead letters of {app.name} on {redact_url(app.broker.display_url)}"
    table.caption = f"{len(shown):,} of {total:,} shown, newest first"
    Console().print(table)


@main.command()
@click.argument("app_path", metavar="APP")
@click.option("--queue", "-Q", required=True, help="The queue whose dead letters go back.")
@click.option("--reason", help="Only dead letters whose reason contains TEXT (any case).")
@click.option(
    "--id",
    "ids",
    multiple=True,
    metavar="ID",
    help="Only the dead letter of this task id (repeat for more).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_clear_errors
def requeue(app_path: str, queue: str, reason: str | None, ids: tuple[str, ...], yes: bool) -> None:
    """Send dead letters back to their queue to run again, as new messages (delivery count 1)."""
    from conveyor.deadletters import Selection, describe

    app = _load_app(app_path)
    _check_queue(app, queue)
    selection = Selection(reason, frozenset(ids))
    [stats] = app.broker.stats([queue])
    count, missing = stats.dead, set()
    if not selection.everything:
        chosen = [d for d in app.broker.dead_letters(queue, max(stats.dead, 1)) if selection(d)]
        count, missing = len(chosen), set(ids) - {describe(d).id for d in chosen}
    if missing:
        # All or nothing: requeuing the rest would leave the caller guessing what happened.
        listed = ", ".join(sorted(missing))
        also = f" with a reason containing {reason!r}" if reason else ""
        raise click.ClickException(
            f"no dead letter{also} in {queue} has the task id {listed}; nothing was requeued "
            f"(conveyor dead-letters {app_path} --queue {queue} lists them)"
        )
    if not count:
        matching = f" with a reason containing {reason!r}" if reason else ""
        click.echo(f"no dead letters{matching} in {queue}: nothing to requeue")
        return
    noun = "dead letter" if count == 1 else "dead letters"
    if not yes:
        click.confirm(f"Send {count:,} {noun} of {queue!r} back to run again?", abort=True)
    moved = _requeue_with_progress(app, queue, None if selection.everything else selection, count)
    noun = "dead letter" if moved == 1 else "dead letters"
    click.echo(f"requeued {moved:,} {noun} to {queue}")


@main.command()
@click.option("--tasks", "-n", default=20_000, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", "-c", default=2, show_default=True, type=click.IntRange(min=1))
@_clear_errors
def demo(tasks: int, concurrency: int) -> None:
    """Send TASKS orders to the embedded broker and process them, with progress and a summary."""
    from rich.console import Console

    from conveyor.demo import run

    run(Console(), tasks=tasks, concurrency=concurrency)


# events and inspection (conveyor.control)


@main.command()
@click.argument("app_path", metavar="APP")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event, a line each.")
@click.option("--count", "-n", type=click.IntRange(min=1), help="Exit after N events.")
@click.option("--duration", type=click.FloatRange(min=0), help="Exit after S seconds.")
@click.option(
    "--listen-only",
    is_flag=True,
    help="Do not turn events on in the workers: show only those of workers started with --events.",
)
@_clear_errors
def events(
    app_path: str, as_json: bool, count: int | None, duration: float | None, listen_only: bool
) -> None:
    """Print the task events and heartbeats of APP's workers as they happen.

    While it runs, every worker of APP publishes its events (they stop within 10 s of the last
    reader going away). The event schema is in docs/events.md.
    """
    from rich.console import Console

    from conveyor.control import EventReader
    from conveyor.control.display import event_json, event_line

    app = _load_app(app_path)
    console = Console(highlight=False)
    deadline = math.inf if duration is None else time.monotonic() + duration
    seen = 0
    try:
        with EventReader(app, request=not listen_only) as reader:
            while (left := deadline - time.monotonic()) > 0:
                for event in reader.read(min(left, 1.0)):
                    if as_json:
                        click.echo(event_json(event))
                    else:
                        console.print(event_line(event), soft_wrap=True)
                    seen += 1
                    if count is not None and seen >= count:
                        return
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `conveyor events | head`: the reader of the output went away
        # What is still buffered goes nowhere, not into a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@main.command()
@click.argument("app_path", metavar="APP")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds to wait for the workers' answers.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document: workers and silent.")
@_clear_errors
def inspect(app_path: str, timeout: float, as_json: bool) -> None:
    """List APP's live workers: their active and reserved tasks, registered tasks and stats.

    Exits with status 1 when a worker that is known to run (its heartbeat lease has not run out)
    did not answer within the timeout, or when no worker answered.
    """
    from rich.console import Console

    from conveyor.control import inspect as ask
    from conveyor.control.display import inspect_json, show_inspection

    app = _load_app(app_path)
    result = ask(app, timeout=timeout)
    if as_json:
        click.echo(inspect_json(result))
    else:
        show_inspection(Console(), app.name, result, timeout)
    if result.silent or not result.reports:
        sys.exit(1)


# revoke


@main.command()
@click.argument("app_path", metavar="APP")
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@click.option(
    "--terminate",
    is_flag=True,
    help="Also stop a task that is running (prefork pool: its child is killed).",
)
@_clear_errors
def revoke(app_path: str, ids: tuple[str, ...], terminate: bool) -> None:
    """Revoke tasks by id: every worker skips them, also one that starts later (docs/revoke.md).

    Prints, per id, what the result store knows of it: queued, running, finished (left alone)
    or unknown (revoked anyway).
    """
    from conveyor.revocations import revoke as revoke_ids

    app = _load_app(app_path)
    try:
        reports = revoke_ids(app, ids, terminate=terminate)
        where = app.revocations.display_url if app.revocations is not None else "-"
    finally:
        app.close()
    for report in reports:
        click.echo(f"{report.id}: {report.describe()}")
    recorded = sum(report.recorded for report in reports)
    noun = "revocation" if recorded == 1 else "revocations"
    click.echo(f"{recorded} {noun} recorded in {redact_url(where)}")


def _queues(app: Conveyor) -> list[str]:
    """The app's own queues (listed even when empty), and others the broker holds messages of."""
    known = {app.settings.default_queue} | {task.queue for task in app.tasks.values()}
    return sorted(known | {s.queue for s in app.broker.stats()})


def _check_queue(app: Conveyor, queue: str) -> None:
    """Refuse a queue that is neither the app's nor known to the broker (a typo, usually)."""
    known = _queues(app)
    if queue in known or app.broker.exists(queue):
        return
    raise click.ClickException(
        f"no queue {queue!r} on {redact_url(app.broker.display_url)}; known queues: "
        f"{', '.join(known)} (the app's own, and those holding messages)"
    )


def _dead_letter_table(shown: list[Described]) -> Table:
    """A table of dead letters; everything in it is `Text`, so nothing is read as markup."""
    from rich.table import Table
    from rich.text import Text

    from conveyor.deadletters import preview
    from conveyor.reasons import DeadLetterReason

    table = Table()
    table.add_column("queue", overflow="fold")
    table.add_column("died at")
    table.add_column("deliveries", justify="right")
    table.add_column("task", overflow="fold")
    # Whole, never cut short: the id is what `requeue --id` takes.
    table.add_column("id", overflow="fold")
    table.add_column("reason", overflow="fold")
    for item in shown:
        letter = item.letter
        died = "-"
        if letter.died_at > 0:
            died = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.died_at))
        if item.problem is None:
            task, task_id = Text(item.task or ""), Text(item.id or "")
        else:
            # Still listed and requeueable: a worker will dead-letter it again.
            why = DeadLetterReason.of(item.problem)
            note = f"not an envelope ({why.value if why else item.problem})"
            task = Text(f"{note}: {preview(letter.body)}", style="italic")
            task_id = Text("-")
        reason = Text(redact_text(letter.reason))
        category = DeadLetterReason.of(letter.reason)
        if category is not None:
            reason.stylize("bold", 0, len(category.value))
        table.add_row(Text(letter.queue), died, f"{letter.delivery_count:,}", task, task_id, reason)
    return table


def _requeue_with_progress(
    app: Conveyor, queue: str, select: Callable[[DeadLetter], bool] | None, count: int
) -> int:
    """Requeue, with a progress bar on stderr when there are many."""
    if count < PROGRESS_FROM:
        return app.broker.requeue_dead(queue, select)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("requeuing"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        bar = progress.add_task("requeue", total=count)
        return app.broker.requeue_dead(queue, select, progress=lambda n: progress.advance(bar, n))


def _json(text: str, what: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise click.ClickException(
            f"{what} is not valid JSON ({exc}): strings need quotes, e.g. '\"a.png\"'"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
