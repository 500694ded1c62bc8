"""The worker's event loop (`loop`, `--loop`): auto, asyncio or uvloop, and only the worker's.

Each worker run here is on the embedded SQLite broker, with an `async def` task that reports
the loop it ran on: with the asyncio pool that is the worker's own loop, with prefork a child's.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import uvloop

from conveyor import Conveyor, Worker
from conveyor.errors import ConfigurationError
from conveyor.settings import Settings
from conveyor.worker.loops import LOOPS, choose


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import uvloop` fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Conveyor]:
    application = Conveyor("loops", broker=f"sqlite:///{tmp_path}/q.db")

    @application.task(name="loops.which")
    async def which() -> str:
        """The package of the running loop's class: asyncio or uvloop."""
        return type(asyncio.get_running_loop()).__module__.partition(".")[0]

    yield application
    application.close()


def loop_of_a_task(app: Conveyor, pool: str, loop: str | None) -> tuple[Worker, str]:
    result = app.tasks["loops.which"].delay()
    worker = Worker(app, pool=pool, concurrency=1, until_empty=True, loop=loop)
    stats = worker.run()
    assert stats.succeeded == 1
    return worker, str(result.get(timeout=5))


def test_the_settings_loops_are_the_ones_the_worker_knows() -> None:
    assert get_args(get_type_hints(Settings)["loop"]) == LOOPS == ("auto", "asyncio", "uvloop")
    assert Settings().loop == "auto"


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_the_worker_runs_on_the_loop_asked_for(app: Conveyor, name: str) -> None:
    worker, ran_on = loop_of_a_task(app, "asyncio", name)
    assert worker.loop_name == ran_on == name


def test_auto_is_uvloop_when_installed(app: Conveyor) -> None:
    worker, ran_on = loop_of_a_task(app, "asyncio", None)
    assert worker.loop_name == ran_on == "uvloop"


def test_auto_is_asyncio_without_uvloop(app: Conveyor, no_uvloop: None) -> None:
    worker, ran_on = loop_of_a_task(app, "asyncio", "auto")
    assert worker.loop_name == ran_on == "asyncio"


def test_the_setting_chooses_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_LOOP", "asyncio")
    application = Conveyor("loops", broker=f"sqlite:///{tmp_path}/q.db")
    try:
        assert Worker(application).loop_name == "asyncio"
        assert Worker(application, loop="uvloop").loop_name == "uvloop"  # the argument wins
    finally:
        application.close()


def test_prefork_children_keep_asyncios_loop(app: Conveyor) -> None:
    """uvloop is the worker's loop only: a child runs its async tasks on asyncio's."""
    worker, ran_on = loop_of_a_task(app, "prefork", "uvloop")
    assert (worker.loop_name, ran_on) == ("uvloop", "asyncio")


def test_the_policy_is_left_alone(app: Conveyor) -> None:
    """Loops conveyor starts on other threads (a producer's RabbitMQ connection) stay asyncio's."""
    loop_of_a_task(app, "asyncio", "uvloop")
    fresh = asyncio.new_event_loop()
    try:
        assert not isinstance(fresh, uvloop.Loop)
    finally:
        fresh.close()


def test_uvloop_without_uvloop_says_how_to_install_it(app: Conveyor, no_uvloop: None) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Worker(app, loop="uvloop")
    message = str(caught.value)
    assert "pip install 'conveyor[uvloop]'" in message and "--loop asyncio" in message


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown event loop 'trio'; use one of auto"):
        choose("trio")


def test_an_unknown_loop_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="CONVEYOR_LOOP"):
        Settings.load(env={"CONVEYOR_LOOP": "trio"})
