"""Worker pools. `create` picks one by name."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from conveyor.errors import ConfigurationError
from conveyor.worker.pools.base import Pool

if TYPE_CHECKING:
    from conveyor.app import Conveyor

POOLS = ("prefork", "threads", "asyncio", "solo")


def check_concurrency(name: str, concurrency: int) -> None:
    """Refuse a number of tasks at once that the pool called `name` cannot run."""
    if name == "solo" and concurrency > 1:
        raise ConfigurationError(
            f"the solo pool runs one task at a time, on the worker's own thread, so it cannot "
            f"run {concurrency} at once: use the threads pool (blocking I/O) or prefork (CPU) "
            "for more, or a concurrency of 1"
        )


def create(
    name: str,
    concurrency: int,
    *,
    app: Conveyor | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
) -> Pool:
    """The pool called `name` with `concurrency` slots (prefork also needs the app)."""
    if name == "prefork":
        if sys.platform != "linux":
            raise ConfigurationError(
                "the prefork pool needs Linux (pipes and /proc); use --pool threads here"
            )
        if app is None:
            raise ConfigurationError("the prefork pool needs the app its children run tasks of")
        from conveyor.worker.pools.prefork import PreforkPool

        return PreforkPool(
            concurrency,
            app,
            max_tasks=max_tasks_per_child,
            max_memory=max_memory_per_child,
            start_timeout=app.settings.child_start_timeout,
        )
    if name == "asyncio":
        from conveyor.worker.pools.asyncio import AsyncioPool

        return AsyncioPool(concurrency)
    if name == "threads":
        from conveyor.worker.pools.threads import ThreadPool

        return ThreadPool(concurrency)
    if name == "solo":
        from conveyor.worker.pools.solo import SoloPool

        return SoloPool()
    raise ConfigurationError(f"unknown pool {name!r}: choose one of {', '.join(POOLS)}")
