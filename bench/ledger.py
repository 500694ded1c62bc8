"""Exactly-once checks for benchmark tasks: every run of a task writes one line, and the harness
counts them, so no lost or doubled task can hide behind a fast number.

A benchmark task calls `record(n)` with its task number (the same code for every peer, so the
cost is the same for all): one `write` of a short line to a file of its own process, opened with
`O_APPEND` in the directory named by the `BENCH_LEDGER` environment variable. `verify(directory,
n)` then reads every file and says which of 0..n-1 ran other than once. A harness refuses to
report a run whose ledger does not balance.

The task side has no imports beyond `os` and is pasted into the peers' app modules as
`TASK_SIDE`, so it runs unchanged under every task queue.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "BENCH_LEDGER"

TASK_SIDE = '''
import os as _os

_ledger_fd = None
_ledger_pid = 0


def record(n):
    """Note that task number n ran, in this process's ledger file."""
    global _ledger_fd, _ledger_pid
    pid = _os.getpid()
    if _ledger_fd is None or _ledger_pid != pid:  # a forked child opens a file of its own
        path = _os.path.join(_os.environ["BENCH_LEDGER"], f"{pid}-{_os.urandom(4).hex()}.log")
        _ledger_fd = _os.open(path, _os.O_WRONLY | _os.O_CREAT | _os.O_APPEND, 0o644)
        _ledger_pid = pid
    _os.write(_ledger_fd, b"%d\\n" % n)
'''


@dataclass(frozen=True)
class Balance:
    """What a ledger says about tasks 0..n-1."""

    expected: int
    ran: int
    lost: list[int]
    doubled: dict[int, int]
    strangers: int
    """Lines that are not a task number of this run."""

    @property
    def exact(self) -> bool:
        """Every task ran exactly once, and nothing else ran."""
        return not self.lost and not self.doubled and not self.strangers

    def describe(self) -> str:
        """One line for an error message."""
        return (
            f"{self.ran:,} runs of {self.expected:,} tasks: {len(self.lost):,} lost "
            f"(first {self.lost[:5]}), {len(self.doubled):,} ran more than once "
            f"(first {list(self.doubled.items())[:5]}), {self.strangers:,} unknown lines"
        )


def verify(directory: Path, n: int) -> Balance:
    """Count the runs recorded in `directory` against tasks 0..n-1."""
    counts: collections.Counter[int] = collections.Counter()
    strangers = 0
    for path in directory.glob("*.log"):
        for line in path.read_bytes().splitlines():
            try:
                number = int(line)
            except ValueError:
                strangers += 1
                continue
            if 0 <= number < n:
                counts[number] += 1
            else:
                strangers += 1
    lost = [i for i in range(n) if counts[i] == 0]
    doubled = {i: c for i, c in counts.items() if c > 1}
    return Balance(n, sum(counts.values()), lost, doubled, strangers)


def fresh(directory: Path) -> dict[str, str]:
    """Create an empty ledger directory; the environment a worker needs to write to it."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.log"):
        path.unlink()
    return {**os.environ, ENV: str(directory)}
