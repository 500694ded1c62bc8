"""The app the chaos runs' workers load (`conveyor worker chaos_app:app`).

Its one task notes each run in the PostgreSQL ledger (see `ledger.py`) through a per-process
connection resource, then works for `CONVEYOR_CHAOS_TASK_SECONDS` (2 ms by default), so a run
lasts long enough for its faults to land among running tasks. The broker comes from
`CONVEYOR_BROKER`, like any conveyor app.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ledger import connection_resource, record

from conveyor import Conveyor

app = Conveyor("chaos")
WORK_S = float(os.environ.get("CONVEYOR_CHAOS_TASK_SECONDS", "0.002"))


ledger = connection_resource(app, "chaos.ledger")


@app.task(name="chaos.step", bind=True, ignore_result=True)
def step(self: Any, n: int) -> None:
    """Record this run, then work a little."""
    record(ledger(), self.request.id, self.request.delivery_count)
    time.sleep(WORK_S)  # stands for the task's own work
