"""A password in any URL conveyor takes never shows: not in reprs, display URLs, errors, logs, or
`conveyor status` output.

Every URL carries the same password to a port where nothing listens (or a service that refuses
it), so connecting fails and the failure paths are covered as well as the quiet ones. Nothing
here needs a running service: a refused connection is the point.
"""

from __future__ import annotations

import logging
import socket
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from stores import require_service

from conveyor import Conveyor, Worker
from conveyor.cli import main
from conveyor.errors import ConveyorError

pytestmark = pytest.mark.integration

SECRET = "Zq7-s3cr3t-PASSWORD"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def urls() -> dict[str, str]:
    """Each kind of URL with the password, to a port nobody listens on."""
    return {
        "rabbitmq broker": f"amqp://guest:{SECRET}@127.0.0.1:{free_port()}/",
        "redis results": f"redis://user:{SECRET}@127.0.0.1:{free_port()}/0",
        "postgresql results": f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/test",
    }


def attempt(action: Callable[[], Any]) -> str:
    """Run something that should fail; the text of what it raised (empty if nothing)."""
    try:
        action()
    except (ConveyorError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc} {exc!r}"
    return ""


def test_no_password_in_reprs_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for kind, url in urls().items():
            if kind.endswith("broker"):
                app = Conveyor("secrets", broker=url, results=None)
                seen += [repr(app), repr(app.broker), app.broker.display_url]

                @app.task(name="secrets.noop")
                def noop() -> None: ...

                seen.append(attempt(noop.delay))
                seen.append(attempt(lambda app=app: app.broker.stats(["default"])))
            else:
                app = Conveyor("secrets", broker="memory://", results=url)
                store = app.results
                assert store is not None
                seen += [repr(app), repr(store), store.display_url]
                seen.append(attempt(lambda store=store: store.get("missing")))
                seen.append(attempt(lambda store=store: store.count()))
            app.close()
    text = "\n".join(seen) + "\n" + "\n".join(r.getMessage() for r in caplog.records)
    print(
        f"\npassword in refused URLs: found {text.count(SECRET)} times in {len(seen)} reprs "
        f"and errors and {len(caplog.records)} log records"
    )
    assert "***" in text, "the URLs are shown, masked"
    assert SECRET not in text
    for record in caplog.records:
        assert SECRET not in str(record.args) and SECRET not in (record.exc_text or "")


def test_no_password_in_mqtt_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("paho.mqtt")
    from conveyor.integrations.mqtt import MqttPublisher

    url = f"mqtt://user:{SECRET}@127.0.0.1:{free_port()}"
    with caplog.at_level(logging.DEBUG):
        error = attempt(lambda: MqttPublisher(url, connect_timeout=2))
    assert error, "a refused connection raises"
    assert SECRET not in error
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_no_password_in_status_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"secrets_app_{uuid.uuid4().hex[:8]}"
    broker = f"amqp://guest:{SECRET}@127.0.0.1:{free_port()}/"
    (tmp_path / f"{module}.py").write_text(
        f"from conveyor import Conveyor\n\napp = Conveyor('secrets', broker={broker!r})\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    try:
        outcome = CliRunner().invoke(main, ["status", f"{module}:app"], prog_name="conveyor")
    finally:
        loaded = sys.modules.pop(module, None)
        if loaded is not None:
            loaded.app.close()
    assert outcome.exit_code != 0, "the broker is not there: status fails"
    assert "***" in outcome.output, "and says where it looked, masked"
    assert SECRET not in outcome.output
    assert SECRET not in repr(outcome.exception)


def test_no_password_while_everything_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The quiet path: a PostgreSQL result store whose URL has a password (the local server
    trusts 127.0.0.1, so it connects), a worker running tasks with DEBUG logging, `conveyor
    status`, reprs and results; then Redis refusing a password it does not have."""
    require_service("PostgreSQL", "127.0.0.1", 5432, "pg_ctlcluster ... main start")
    require_service("Redis", "127.0.0.1", 6379, "redis-server --daemonize yes ...")
    results = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test"
    module = f"secrets_app_{uuid.uuid4().hex[:8]}"
    broker = f"sqlite:///{tmp_path / 'q.db'}"
    (tmp_path / f"{module}.py").write_text(
        "from conveyor import Conveyor\n\n"
        f"app = Conveyor('secrets', broker={broker!r}, results={results!r})\n\n"
        "@app.task(name='secrets.add')\ndef add(x, y):\n    return x + y\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    seen: list[str] = []
    try:
        with caplog.at_level(logging.DEBUG):
            app = __import__(module).app
            handles = app.tasks["secrets.add"].map([(n, n) for n in range(20)])
            Worker(app, pool="threads", concurrency=2, until_empty=True).run()
            seen += [str(h.get(timeout=10)) for h in handles]
            seen += [repr(app), repr(app.results), app.results.display_url]
            status = CliRunner().invoke(main, ["status", f"{module}:app"], prog_name="conveyor")
            assert status.exit_code == 0, status.output
            seen.append(status.output)
            refused = Conveyor("secrets", broker="memory://", results=redis_url())
            seen.append(attempt(lambda: refused.results.get("missing")))  # type: ignore[union-attr]
            refused.close()
    finally:
        loaded = sys.modules.pop(module, None)
        if loaded is not None:
            loaded.app.close()
    logged = [r.getMessage() for r in caplog.records]
    logged += [str(r.args) + (r.exc_text or "") for r in caplog.records]
    texts = seen + logged
    found = sum(text.count(SECRET) for text in texts)
    print(
        f"\npassword in working URLs: found {found} times in {len(seen)} outputs, reprs and "
        f"errors and {len(caplog.records)} log records"
    )
    assert "***" in status.output, "status shows where the results are, masked"
    assert found == 0


def redis_url() -> str:
    """The local Redis, which has no password: it refuses AUTH with one."""
    return f"redis://user:{SECRET}@127.0.0.1:6379/15"
