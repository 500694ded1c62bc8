"""The `conveyor` command as a real process: entry points, and what reaches a real stderr."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from uuid import uuid4

import pytest
from conftest import require_rabbitmq

pytestmark = pytest.mark.integration

TIMEOUT_S = 8.0

APP_SOURCE = """
from conveyor import Conveyor

app = Conveyor("t", broker="sqlite:///q.db")


@app.task
def add(x, y=0):
    return x + y
"""


def run(
    *args: str, cwd: Path | None = None, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_python_m_conveyor_help() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: python -m conveyor [OPTIONS] COMMAND [ARGS]...")
    for command in ("worker", "send", "status", "purge", "dead-letters", "requeue", "demo"):
        assert f"\n  {command} " in proc.stdout
    assert proc.stderr == ""


def test_version() -> None:
    expected = version("conveyor")
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"version {expected}")
    script = Path(sys.executable).with_name("conveyor")
    if not script.exists():
        pytest.skip("the conveyor console script is not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"conveyor, version {expected}\n"


def test_wrong_input_is_one_line_on_stderr(tmp_path: Path) -> None:
    proc = run("status", "nocolon", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "Error: app path 'nocolon' must look like module:attribute, e.g. shop:app\n"
    )


def test_missing_dependency_inside_the_app_module(tmp_path: Path) -> None:
    """What a user sees when their module exists but something it imports does not.

    Today the ModuleNotFoundError is re-raised, so this is a full traceback whose last line names
    the dependency; the app module is not blamed.
    """
    dep = f"dependency_{uuid4().hex[:8]}"
    (tmp_path / "shop_tasks.py").write_text(f"import {dep}\n")
    proc = run("status", "shop_tasks:app", cwd=tmp_path)
    assert proc.returncode == 1
    assert "cannot import module 'shop_tasks'" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"ModuleNotFoundError: No module named '{dep}'")


def test_send_wait_nan_does_not_hang(tmp_path: Path) -> None:
    (tmp_path / "nanapp.py").write_text(APP_SOURCE)
    try:
        proc = run(
            "send", "nanapp:app", "nanapp.add", "1", "--wait", "nan", cwd=tmp_path, timeout=3
        )
    except subprocess.TimeoutExpired:
        pytest.fail("send --wait nan was still waiting after 3 s (no worker runs)")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


RABBITMQ_APP = """
from conveyor import Conveyor

app = Conveyor("t", broker="{url}")
"""


def _free_port() -> int:
    """A local port nothing listens on (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _status_of(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    module = f"rabbit_{uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(RABBITMQ_APP.format(url=url))
    return run("status", f"{module}:app", cwd=tmp_path, timeout=30)


def test_an_unreachable_rabbitmq_is_one_line_on_stderr(tmp_path: Path) -> None:
    """aiormq logs the failed connect itself, and with no logging configured Python printed
    that record bare above conveyor's own error: `error when creating transport: ...`."""
    port = _free_port()
    proc = _status_of(tmp_path, f"amqp://guest:hunter2@127.0.0.1:{port}/")
    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        f"Error: cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:{port}/"
    )
    assert "hunter2" not in proc.stderr


def test_a_wrong_rabbitmq_password_is_one_line_on_stderr(tmp_path: Path) -> None:
    require_rabbitmq()
    proc = _status_of(tmp_path, "amqp://guest:wrong-hunter2@127.0.0.1:5672/")
    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("Error: cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:5672/")
    assert "ACCESS_REFUSED" in line
    assert "hunter2" not in proc.stderr
