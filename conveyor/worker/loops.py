"""The worker's event loop: asyncio's own, or uvloop's (`conveyor worker --loop`).

On RabbitMQ with the prefork or threads pool, the worker's loop runs the broker connection:
it reads every delivery, feeds the children's pipes and sends the acks, so its overhead per
event is part of every task's cost (docs/deploying.md has the measurements). Only this one
loop changes. Prefork children and their zygote run no loop of the worker's, and loops that
conveyor starts on threads of their own (a producer's RabbitMQ connection; the worker's with
the solo and asyncio pools) stay asyncio's: the event-loop policy is never touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal, get_args

from conveyor.errors import ConfigurationError

LoopName = Literal["auto", "asyncio", "uvloop"]
LOOPS: tuple[str, ...] = get_args(LoopName)
LoopFactory = Callable[[], asyncio.AbstractEventLoop]
INSTALL_UVLOOP = "pip install 'conveyor[uvloop]'"


def choose(name: str) -> tuple[str, LoopFactory]:
    """The loop `name` asks for: ("asyncio" or "uvloop", a function that makes one).

    `auto` is uvloop when it can be imported, else asyncio; `uvloop` without uvloop installed
    is a `ConfigurationError` that says how to install it.
    """
    if name not in LOOPS:
        raise ConfigurationError(f"unknown event loop {name!r}; use one of {', '.join(LOOPS)}")
    if name == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        if name == "auto":
            return "asyncio", asyncio.new_event_loop
        raise ConfigurationError(
            f"the event loop 'uvloop' needs uvloop, which is not installed: {INSTALL_UVLOOP} "
            "(Linux and macOS), or use asyncio's loop (--loop asyncio, CONVEYOR_LOOP=asyncio)"
        ) from exc
    return "uvloop", uvloop.new_event_loop
