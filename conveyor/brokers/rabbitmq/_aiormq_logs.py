"""Keep aiormq's line about a failed connect of conveyor's from printing beside conveyor's error.

aiormq (checked against 7.2.4) logs a connect whose socket cannot be opened at ERROR, as
`error when creating transport: <...>` from `Connection.connect`, and then raises. conveyor
turns that exception into one clear error (`cannot connect to RabbitMQ at ...: ...`). Where the
program configured no logging (the `conveyor` command, most scripts), Python's last-resort
handler prints aiormq's record bare on stderr: a second line, without context, beside it.

`quiet_connect()` marks conveyor's own connects. While it is active (a context variable, so only
the coroutine that connects and the tasks it starts see it), records emitted by aiormq's
`Connection.connect` itself are dropped: what they say reaches the user in conveyor's error.
Every other aiormq record, and aiormq's records about connections the user's own code opens,
pass as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar

#: The logger aiormq's connection module logs to, and the function whose records are dropped.
LOGGER = "aiormq.connection"
FUNCTION = "connect"

_connecting: ContextVar[bool] = ContextVar("conveyor_amqp_connecting", default=False)


class _OwnConnect(logging.Filter):
    """Drops the records of `Connection.connect` made while conveyor connects."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_connecting.get() and record.funcName == FUNCTION)


_filter = _OwnConnect()


def install() -> None:
    """Add the filter to aiormq's connection logger (once; it does nothing outside
    `quiet_connect`)."""
    logger = logging.getLogger(LOGGER)
    if _filter not in logger.filters:
        logger.addFilter(_filter)


@contextlib.contextmanager
def quiet_connect() -> Iterator[None]:
    """Around conveyor's own `aiormq.connect`, whose failures conveyor reports itself."""
    token = _connecting.set(True)
    try:
        yield
    finally:
        _connecting.reset(token)
