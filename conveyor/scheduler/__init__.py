"""Periodic tasks: schedules, and the scheduler that sends each tick once.

Declare with `@app.periodic(cron=..., tz=...)` on a task or `app.schedule(task, every=...)`; run
`conveyor scheduler module:app` (or `conveyor worker --scheduler`) in as many places as you like.
"""

from conveyor.scheduler.runner import HEADER_SCHEDULE, HEADER_TICK, Scheduler
from conveyor.scheduler.schedules import Schedule, tick_id, tick_task_id

__all__ = ["HEADER_SCHEDULE", "HEADER_TICK", "Schedule", "Scheduler", "tick_id", "tick_task_id"]
