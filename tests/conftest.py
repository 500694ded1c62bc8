"""Shared fixtures: a fresh memory app, and polling with a deadline instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from conveyor import Conveyor
from conveyor.testing import memory_app

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy (and return it), or fail at the deadline.

    The suite waits this way (or with a bounded join), never with a bare sleep as synchronization.
    """
    deadline = time.monotonic() + timeout
    interval = 0.001
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)
        interval = min(interval * 2, 0.02)


@pytest.fixture
def poll() -> Callable[..., Any]:
    """`poll(condition, timeout=5.0, what="...")`: see `wait_for`."""
    return wait_for


@pytest.fixture
def app() -> Iterator[Conveyor]:
    """A fresh app on the memory broker and memory result store."""
    application = memory_app()
    yield application
    application.close()
