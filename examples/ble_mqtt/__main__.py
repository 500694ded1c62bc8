"""`python -m examples.ble_mqtt run`: BLE readings through prefork workers to MQTT, counted.

Subscribes first, sends the readings in batches to a fresh SQLite broker in a temporary
directory, runs a prefork worker in this process until the queue is empty, waits for the
subscriber to have everything the broker confirmed, and prints what was sent, rejected,
published, delivered and duplicated, and how many children and MQTT connections it took. The
exit status is 1 if a good reading is missing or a task failed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor import Conveyor, Worker
from conveyor.log import setup as setup_logging
from examples.ble_mqtt.frames import generate
from examples.ble_mqtt.pipeline import Report, good_ids, send_batches, summarize
from examples.ble_mqtt.subscriber import Subscriber, SubscriberError
from examples.ble_mqtt.tasks import MQTT_URL, Config, create_app


@click.group()
def main() -> None:
    """BLE beacon readings published to MQTT by conveyor's prefork workers."""


@main.command()
@click.option("--readings", "-n", default=10_000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--children", "-c", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--max-tasks-per-child", default=20, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--malformed",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of readings corrupted on purpose.",
)
@click.option("--seed", default=1, show_default=True, help="The same seed, the same readings.")
@click.option("--mqtt-url", envvar="BLE_MQTT_URL", default=MQTT_URL, show_default=True)
@click.option("--prefix", help="Topic prefix [default: a new ble-demo/<random> per run].")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds the run may take.")
@click.option(
    "--naive",
    is_flag=True,
    help="Publish through one client made at import, before the fork: the failure.",
)
def run(
    readings: int,
    batch: int,
    children: int,
    max_tasks_per_child: int,
    malformed: float,
    seed: int,
    mqtt_url: str,
    prefix: str | None,
    timeout: float,
    naive: bool,
) -> None:
    """Run the whole pipeline against an MQTT broker and print what arrived."""
    console = Console()
    setup_logging("WARNING")
    logging.getLogger("ble_mqtt").setLevel(logging.WARNING)  # rejections are in the table
    data = generate(readings, seed, malformed)
    expected = len(good_ids(data))
    with tempfile.TemporaryDirectory(prefix="ble-mqtt-") as workdir:
        config = Config(
            broker=f"sqlite:///{Path(workdir) / 'broker.db'}",
            mqtt_url=mqtt_url,
            prefix=prefix or f"ble-demo/{uuid.uuid4().hex[:8]}",
        )
        subscriber = Subscriber(config.mqtt_url, config.prefix, len(data))
        try:
            subscriber.start()
        except SubscriberError as exc:
            raise click.ClickException(f"{exc} (is an MQTT broker running there?)") from None
        with subscriber:
            app = _create_app(config, naive)
            started = time.monotonic()
            results = send_batches(app, data, batch)
            worker = Worker(
                app,
                pool="prefork",
                concurrency=children,
                until_empty=True,
                max_tasks_per_child=max_tasks_per_child,
                shutdown_grace=5,
            )
            console.print(f"{readings} readings in {len(results)} tasks, {children} children")
            console.print(f"publishing to {config.mqtt_url}, topics {config.prefix}/<MAC>")
            _run_with_progress(worker, subscriber, expected, timeout, console)
            report = summarize(data, results, subscriber)
            elapsed = time.monotonic() - started
            app.close()
    console.print(_table(report, elapsed, naive))
    if report.rejected:
        console.print(_rejections(report))
    if not report.complete:
        shown = ", ".join(map(str, report.missing[:10]))
        more = "..." if len(report.missing) > 10 else ""
        console.print(
            f"[red]{len(report.missing)} readings missing ({shown}{more}), "
            f"{report.failed} tasks failed[/red]"
        )
        raise SystemExit(1)


def _create_app(config: Config, naive: bool) -> Conveyor:
    if not naive:
        return create_app(config)
    os.environ["BLE_MQTT_URL"] = config.mqtt_url  # read when the module connects, at import
    from examples.ble_mqtt import naive as naive_tasks

    return naive_tasks.create_app(config)


def _run_with_progress(
    worker: Worker, subscriber: Subscriber, expected: int, timeout: float, console: Console
) -> None:
    """Run the worker on a thread and show deliveries until it is done (or the time is up)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # shown below; the run still reports what it got
            errors.append(exc)

    thread = threading.Thread(target=target, name="worker", daemon=True)
    deadline = time.monotonic() + timeout
    columns = (
        TextColumn("delivered"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[tasks]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("delivered", total=expected, tasks="")
        thread.start()
        try:
            while thread.is_alive() and time.monotonic() < deadline:
                s = worker.stats
                tasks = f"tasks: {s.succeeded} done, {s.retried} retried, {s.failed} failed"
                progress.update(bar, completed=subscriber.tally().delivered, tasks=tasks)
                thread.join(0.1)
        except KeyboardInterrupt:
            console.print("interrupted: stopping the worker")
        finally:
            if thread.is_alive():
                worker.stop()
                worker.stop()  # cold: give the running tasks back
                thread.join(30)
    if errors:
        raise click.ClickException(f"the worker stopped: {errors[0]!r}")


def _table(report: Report, elapsed: float, naive: bool) -> Table:
    caption = "naive: one MQTT client, made before the fork" if naive else None
    table = Table(title="BLE to MQTT", caption=caption)
    table.add_column("")
    table.add_column("count", justify="right")
    rows = [
        ("readings sent", report.sent),
        ("malformed (rejected, not published)", report.malformed),
        ("published (QoS 2)", report.published),
        ("delivered (unique)", report.delivered),
        ("duplicates (at least once)", report.duplicates),
        ("missing", len(report.missing)),
        ("tasks (failed)", f"{report.tasks} ({report.failed})"),
        ("child processes used", report.children),
        ("MQTT connections used", report.connections),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    table.add_row("seconds", f"{elapsed:.1f}")
    return table


def _rejections(report: Report) -> Table:
    table = Table(title="malformed readings, by reason")
    table.add_column("reason")
    table.add_column("readings", justify="right")
    for reason, count in sorted(report.rejected.items(), key=lambda item: -item[1]):
        table.add_row(reason, str(count))
    return table


if __name__ == "__main__":
    main()
