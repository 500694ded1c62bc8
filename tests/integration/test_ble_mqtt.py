"""The BLE-to-MQTT example against Mosquitto: the failure it is about, the fix, load, a restart.

Each test sends generated BLE readings through prefork workers run in this process and counts
what a subscriber (a spawned process of its own, so its socket is not one the children inherit)
receives on a topic prefix of the test's own. Counts are final after `summarize`, which flushes
the subscriber: a marker it publishes comes back only after everything the broker had confirmed
before it. The shared Mosquitto on 127.0.0.1:1883 is only published and subscribed to; the
restart test starts a private one on a free port. Without Mosquitto these tests skip locally and
fail in CI.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_bounded, start_worker, wait_for
from mosquitto_node import SHARED_URL, private_mosquitto, require_mosquitto

from conveyor import Conveyor, Worker
from examples.ble_mqtt.frames import generate
from examples.ble_mqtt.pipeline import send_batches, summarize
from examples.ble_mqtt.subscriber import Subscriber
from examples.ble_mqtt.tasks import Config, create_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def mosquitto() -> None:
    require_mosquitto()


def config_for(tmp_path: Path, url: str = SHARED_URL, **options: float) -> Config:
    """A broker file and a topic prefix of the test's own."""
    prefix = f"conveyor-test/ble/{uuid.uuid4().hex[:10]}"
    return Config(f"sqlite:///{tmp_path / 'broker.db'}", url, prefix, **options)


@pytest.fixture
def apps() -> Iterator[list[Conveyor]]:
    made: list[Conveyor] = []
    yield made
    for app in made:
        app.close()


def fork_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "conveyor.worker"
        and r.levelno == logging.WARNING
        and "@app.resource" in r.getMessage()
    ]


# the failure, and the fix


def test_a_client_made_before_the_fork_delivers_nothing_and_is_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    apps: list[Conveyor],
) -> None:
    config = config_for(tmp_path)
    readings = generate(200, seed=1)
    monkeypatch.setenv("BLE_MQTT_URL", config.mqtt_url)
    with Subscriber(config.mqtt_url, config.prefix, len(readings)) as subscriber:
        # Importing the module connects its client, here in the worker's process, as the story's
        # worker did when it imported its tasks.
        naive = importlib.import_module("examples.ble_mqtt.naive")
        try:
            app = naive.create_app(config)
            apps.append(app)
            results = send_batches(app, readings, batch=50)
            with caplog.at_level(logging.WARNING, logger="conveyor.worker"):
                run_bounded(app, pool="prefork", concurrency=2, timeout=60)
            report = summarize(readings, results, subscriber)
        finally:
            naive.close()
            sys.modules.pop("examples.ble_mqtt.naive", None)
    assert report.delivered <= 5, f"{report.delivered} of 200 delivered through a forked client"
    warnings = fork_warnings(caplog)
    assert warnings, "the worker forked with an MQTT connection open and said nothing"
    assert any(f":{config.mqtt_url.rsplit(':', 1)[1]}" in w for w in warnings), warnings


def test_the_same_pipeline_with_a_resource_delivers_200_of_200(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, apps: list[Conveyor]
) -> None:
    config = config_for(tmp_path)
    readings = generate(200, seed=1)
    with Subscriber(config.mqtt_url, config.prefix, len(readings)) as subscriber:
        app = create_app(config)
        apps.append(app)
        results = send_batches(app, readings, batch=50)
        with caplog.at_level(logging.WARNING, logger="conveyor.worker"):
            stats = run_bounded(app, pool="prefork", concurrency=2, timeout=60)
        report = summarize(readings, results, subscriber)
    assert (report.delivered, report.missing, report.duplicates) == (200, [], 0)
    assert (report.published, report.failed, stats.succeeded) == (200, 0, 4)
    assert report.connections == report.children <= 2, "one connection per child"
    # Nothing of the example's crosses the fork (other tests' connections may, in one session).
    assert not [w for w in fork_warnings(caplog) if ":1883" in w]


# load: children recycle, connections follow children, not tasks


def test_ten_thousand_readings_one_connection_per_child(
    tmp_path: Path, apps: list[Conveyor]
) -> None:
    config = config_for(tmp_path)
    readings = generate(10_000, seed=2, malformed=0.01)
    started = tmp_path / "children"
    started.mkdir()
    with Subscriber(config.mqtt_url, config.prefix, len(readings)) as subscriber:
        app = create_app(config)
        apps.append(app)

        @app.on_process_start
        def note_child() -> None:
            (started / str(os.getpid())).touch()

        results = send_batches(app, readings, batch=50)  # 200 tasks
        stats = run_bounded(app, pool="prefork", concurrency=2, timeout=90, max_tasks_per_child=20)
        report = summarize(readings, results, subscriber)
        values = [r.get(timeout=1) for r in results]
    # Bad input is counted and reported, not published and not fatal.
    assert (report.malformed, report.published) == (100, 9_900)
    assert sum(report.rejected.values()) == 100
    assert (report.delivered, report.missing, report.failed, stats.succeeded) == (9_900, [], 0, 200)
    assert report.duplicates == 0, "no failure, no retry, no duplicate"
    # 200 tasks, 20 per child: at least 10 children, each with one connection of its own.
    assert report.children >= 10
    assert report.connections == report.children
    ran = {v["pid"] for v in values}
    assert len({(v["pid"], v["client_id"]) for v in values}) == len(ran), "a second connection"
    assert ran <= {int(p.name) for p in started.iterdir()}, "every task ran in a child we saw start"


# the broker goes away mid-run and comes back


PERSISTENT = """allow_anonymous true
persistence true
persistence_location {root}/
max_queued_messages 0
max_inflight_messages 0
"""


def test_every_reading_arrives_across_a_broker_restart(
    tmp_path: Path, apps: list[Conveyor]
) -> None:
    root = tmp_path / "mosquitto"
    root.mkdir()
    # Persistence keeps the subscriber's session, and what is queued for it, across the restart;
    # what the publishers had not seen confirmed they publish again when their tasks retry.
    with private_mosquitto(PERSISTENT.format(root=root), root=root) as node:
        config = config_for(tmp_path, node.url, publish_timeout=2.0)
        readings = generate(3_000, seed=3)
        subscriber = Subscriber(config.mqtt_url, config.prefix, len(readings), persistent=True)
        with subscriber:
            app = create_app(config)
            apps.append(app)
            results = send_batches(app, readings, batch=25)
            worker = Worker(
                app, pool="prefork", concurrency=2, until_empty=True, max_tasks_per_child=20
            )
            thread, errors = start_worker(worker)
            try:
                wait_for(
                    lambda: subscriber.tally().delivered >= 300,
                    timeout=30,
                    what="some readings delivered",
                )
                node.stop()
                wait_for(
                    lambda: worker.stats.retried > 0,
                    timeout=30,
                    what="a task to retry while the broker is down",
                )
                assert subscriber.tally().delivered < 3_000, "the broker went away too late"
                node.start()
                thread.join(90)
                assert not thread.is_alive(), "the worker did not finish after the restart"
                assert not errors
            finally:
                if thread.is_alive():
                    worker.stop()
                    worker.stop()
                    thread.join(15)
            report = summarize(readings, results, subscriber)
            tally = subscriber.tally()
    assert report.missing == [], f"{len(report.missing)} readings lost\n{node.log_tail()}"
    assert (report.delivered, report.failed) == (3_000, 0)
    assert worker.stats.retried > 0 and tally.connections >= 2, "both sides saw the outage"


# the command


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.ble_mqtt", "run", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "COLUMNS": "100", "BLE_MQTT_URL": SHARED_URL},
    )


def row(output: str, name: str) -> str:
    match = re.search(rf"{re.escape(name)}\s*│\s*([^│]+?)\s*│", output)
    assert match, f"no row {name!r} in\n{output}"
    return match.group(1)


def test_the_command_prints_the_table_and_succeeds() -> None:
    done = run_command("--readings", "1000", "--batch", "25", "--max-tasks-per-child", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert (row(out, "readings sent"), row(out, "malformed (rejected, not published)")) == (
        "1000",
        "10",
    )
    assert row(out, "delivered (unique)") == row(out, "published (QoS 2)") == "990"
    assert (row(out, "missing"), row(out, "duplicates (at least once)")) == ("0", "0")
    assert row(out, "MQTT connections used") == row(out, "child processes used")
    assert int(row(out, "child processes used")) >= 4


def test_the_command_in_naive_mode_shows_the_failure() -> None:
    done = run_command("--readings", "200", "--naive")
    assert done.returncode == 1, done.stdout + done.stderr
    assert row(done.stdout, "delivered (unique)") == "0"
    assert "@app.resource" in done.stderr
