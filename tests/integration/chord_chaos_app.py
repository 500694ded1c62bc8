"""The app the chord chaos runs' workers load (`conveyor worker chord_chaos_app:app`).

Members return their number after a little work, so that child kills land among running
members; the callback notes its run in the PostgreSQL ledger (see `ledger.py`) and returns
whether it got every member's result, in order. Broker and results come from `CONVEYOR_BROKER`
and `CONVEYOR_RESULTS`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ledger import connection_resource, record

from conveyor import Conveyor

app = Conveyor("chord-chaos")
WORK_S = float(os.environ.get("CONVEYOR_CHAOS_TASK_SECONDS", "0.01"))

ledger = connection_resource(app, "chord-chaos.ledger")


@app.task(name="chord-chaos.member")
def member(n: int) -> int:
    """Work a little, then return `n`."""
    time.sleep(WORK_S)  # stands for the task's own work
    return n


@app.task(name="chord-chaos.collect", bind=True)
def collect(self: Any, values: list[int]) -> list[int]:
    """Note this run in the ledger; the count and whether the values came in order."""
    record(ledger(), self.request.id, self.request.delivery_count)
    return [len(values), int(values == list(range(len(values))))]
