"""The worker: pulls messages from a broker and runs them in a pool."""

from conveyor.worker.verdict import WorkerStats
from conveyor.worker.worker import Worker

__all__ = ["Worker", "WorkerStats"]
