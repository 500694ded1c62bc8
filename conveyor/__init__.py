"""conveyor: a distributed task queue for Python, safe by default and fast.

```python
from conveyor import Conveyor

app = Conveyor("shop")          # embedded SQLite broker and results in ./conveyor.db

@app.task(max_retries=3, retry_backoff=True)
def resize(path: str, width: int) -> str: ...

resize.delay("a.png", 100).get(timeout=10)
```
"""

from conveyor.app import Conveyor
from conveyor.errors import (
    ArgumentError,
    ConfigurationError,
    ConveyorError,
    DecodeError,
    EncodeError,
    MaxRetriesExceeded,
    MemberFailed,
    PublishError,
    ResourceError,
    ResultTimeout,
    Retry,
    SoftTimeLimitExceeded,
    TaskExpired,
    TaskFailed,
    TaskRevoked,
    TaskSkipped,
    TimeLimitExceeded,
    UnknownTaskError,
)
from conveyor.reasons import DeadLetterReason
from conveyor.resources import Resource
from conveyor.results import State
from conveyor.results.handle import Result
from conveyor.settings import Settings
from conveyor.task import Request, Task
from conveyor.worker import Worker, WorkerStats
from conveyor.workflows.canvas import Signature, chain, chord, group
from conveyor.workflows.results import GroupResult

__all__ = [
    "ArgumentError",
    "ConfigurationError",
    "Conveyor",
    "ConveyorError",
    "DeadLetterReason",
    "DecodeError",
    "EncodeError",
    "GroupResult",
    "MaxRetriesExceeded",
    "MemberFailed",
    "PublishError",
    "Request",
    "Resource",
    "ResourceError",
    "Result",
    "ResultTimeout",
    "Retry",
    "Settings",
    "Signature",
    "SoftTimeLimitExceeded",
    "State",
    "Task",
    "TaskExpired",
    "TaskFailed",
    "TaskRevoked",
    "TaskSkipped",
    "TimeLimitExceeded",
    "UnknownTaskError",
    "Worker",
    "WorkerStats",
    "chain",
    "chord",
    "group",
]
