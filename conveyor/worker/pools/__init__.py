"""Worker pools. `create` picks one by name."""

from __future__ import annotations

from conveyor.errors import ConfigurationError
from conveyor.worker.pools.base import Pool

POOLS = ("threads", "solo")


def create(name: str, concurrency: int) -> Pool:
    """The pool called `name` with `concurrency` slots."""
    if name == "threads":
        from conveyor.worker.pools.threads import ThreadPool

        return ThreadPool(concurrency)
    if name == "solo":
        from conveyor.worker.pools.solo import SoloPool

        return SoloPool()
    if name == "prefork":
        raise ConfigurationError(
            "the prefork pool is not available in this version; use --pool threads or solo"
        )
    raise ConfigurationError(f"unknown pool {name!r}: choose one of {', '.join(POOLS)}")
