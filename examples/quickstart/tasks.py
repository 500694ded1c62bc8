"""The quickstart's tasks.

Tasks and results go to ./conveyor.db, so run the worker and the sender from this directory.
"""

from conveyor import Conveyor

app = Conveyor("shop")


@app.task
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y
