"""The app of the held-messages test (`conveyor worker held_app:app`).

`held.step` notes each run in the PostgreSQL ledger (see `ledger.py`) with its delivery count;
`held.warm` does nothing, quickly, so that the pool learns its tasks are short and raises its
look-ahead (and the broker's prefetch); `held.block` holds a child until the worker is killed,
so that the worker holds the messages behind it without starting them. The test sends
these names from an app of its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ledger import connection_resource, record

from conveyor import Conveyor

app = Conveyor("held")
DIR = Path(os.environ.get("HELD_DIR", "."))


ledger = connection_resource(app, "held.ledger")


@app.task(name="held.step", bind=True, ignore_result=True)
def step(self: Any, n: int) -> None:
    """Note this run."""
    record(ledger(), self.request.id, self.request.delivery_count)


@app.task(name="held.warm", ignore_result=True)
def warm(n: int) -> None:
    """Nothing: a short task."""


# Acknowledged before it runs, so a killed worker's blockers are not delivered again: each
# round's worker holds only its own blockers and the held messages.
@app.task(name="held.block", ignore_result=True, acks_late=False)
def block(n: int) -> None:
    """Say it started, then wait for a release file no one writes: until the worker dies."""
    (DIR / f"started-{n}").touch()
    while not (DIR / f"release-{n}").exists():
        time.sleep(0.01)
