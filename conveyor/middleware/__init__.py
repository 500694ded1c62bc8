"""Middleware: the one extension seam. Typed hooks around sending, running and settling a task.

```python
from conveyor.middleware import Middleware

class Timing(Middleware):
    def after_run(self, task, request, outcome):
        print(task.name, outcome.state, outcome.took)

app = Conveyor("shop", middleware=[Timing()])     # or app.add_middleware(Timing())
```

`base` defines the hooks and where each runs; `hooks` precomputes them per kind and isolates
their failures; `signals` is the built-in middleware behind `conveyor.signals`.
"""

from conveyor.middleware.base import HOOK_NAMES, Middleware, RunOutcome, Settled

__all__ = ["HOOK_NAMES", "Middleware", "RunOutcome", "Settled"]
