"""Where fleet-wide state lives: the one store that every worker, scheduler and producer of an
app shares for what must be decided once across machines (schedule claims, revocations).

The `store` setting names it. Unset, it is the result store when that is SQLite, PostgreSQL or
Redis, else the SQLite broker's file: one machine needs nothing more, and a fleet on RabbitMQ
that keeps results in PostgreSQL or Redis already has its store. `scheduler_store` still
overrides it for the schedulers' claims alone.
"""

from __future__ import annotations

from conveyor.settings import Settings

#: The URL schemes a fleet store can have.
SHARED_SCHEMES = ("sqlite:", "postgresql:", "postgres:", "redis:", "rediss:")


def store_url(settings: Settings, *, memory: bool = False) -> str | None:
    """The fleet store's URL: `store`, else the result store if it is SQLite, PostgreSQL or
    Redis, else the SQLite broker's file; None when there is none. `memory`: an app on the
    memory broker or result store (tests) keeps its state in its own process."""
    if settings.store:
        return settings.store
    schemes = (*SHARED_SCHEMES, "memory:") if memory else SHARED_SCHEMES
    for url in (settings.results, settings.broker):
        if url and url.startswith(schemes):
            return url
    return None


#: What to say when no store is found, after "... needs a store to ...".
HOW_TO_SET = (
    "set store (CONVEYOR_STORE) to postgresql://... or redis://... (workers on several "
    "machines) or sqlite:///file.db (one machine); unset, it is the result store if that is "
    "SQLite, PostgreSQL or Redis, else the SQLite broker's file"
)
