"""Helpers for testing code that uses conveyor, in users' test suites and in ours.

```python
from conveyor.testing import memory_app, run_until_empty

def test_resize():
    app = memory_app()

    @app.task
    def double(x: int) -> int:
        return x * 2

    result = double.delay(21)
    stats = run_until_empty(app)
    assert result.get(timeout=1) == 42 and stats.succeeded == 1
```

`run_until_empty` runs a real worker until the queues are empty and every message is settled, so
tests need no sleeps. The pytest fixture `conveyor_app` gives each test a fresh memory-backed app
(enable it with `pytest_plugins = ["conveyor.testing"]` in a conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from conveyor.app import Conveyor
from conveyor.worker import Worker, WorkerStats


def memory_app(name: str = "test", **settings: Any) -> Conveyor:
    """An app on the in-process memory broker and result store: no files, no network."""
    return Conveyor(name, broker="memory://", **settings)


def run_until_empty(
    app: Conveyor,
    *,
    queues: Sequence[str] | None = None,
    pool: str = "threads",
    concurrency: int = 2,
) -> WorkerStats:
    """Run a worker until its queues hold nothing ready, delayed or in flight; its counts."""
    worker = Worker(app, queues=queues, pool=pool, concurrency=concurrency, until_empty=True)
    return worker.run()


try:
    import pytest
except ImportError:  # pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def conveyor_app() -> Iterator[Conveyor]:
        """A fresh memory-backed app for one test."""
        app = memory_app()
        yield app
        app.close()
