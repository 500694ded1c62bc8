"""Nothing network- or file-bound crosses a fork: a child opens its own SQLite connections."""

from __future__ import annotations

import os
from pathlib import Path

from conveyor import _fork
from conveyor.brokers.base import Outgoing
from conveyor.brokers.sqlite import SQLiteBroker


def test_a_forked_child_opens_its_own_sqlite_connection(tmp_path: Path) -> None:
    broker = SQLiteBroker(f"sqlite:///{tmp_path}/q.db")
    try:
        broker.publish([Outgoing("default", b"parent")])
        parent_connection = broker._producer_db.connection()
        pid = os.fork()
        if pid == 0:  # the child: the same broker object must not reuse the parent's connection
            code = 1
            try:
                broker.publish([Outgoing("default", b"child")])
                code = 0 if broker._producer_db.connection() is not parent_connection else 2
                broker.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        broker.publish([Outgoing("default", b"parent again")])
        assert broker._producer_db.connection() is parent_connection, "the parent's is intact"
        (stats,) = broker.stats(["default"])
        assert stats.ready == 3
    finally:
        broker.close()


def test_a_child_forked_with_nothing_to_forget_skips_the_callbacks_but_its_own_child_runs_them(
    tmp_path: Path,
) -> None:
    ran = tmp_path / "ran"

    def mark() -> None:
        with open(ran, "a") as f:
            f.write(f"{os.getpid()}\n")

    _fork.forget_in_child(mark)
    try:
        with _fork.nothing_to_forget():
            pid = os.fork()
        if pid == 0:  # runs no callback; a process it forks does
            code = 1
            try:
                grandchild = os.fork()
                if grandchild == 0:
                    os._exit(0)
                os.waitpid(grandchild, 0)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        after = os.fork()  # outside the block, as ever
        if after == 0:
            os._exit(0)
        os.waitpid(after, 0)
        marks = ran.read_text().split()
        assert len(marks) == 2
        assert str(pid) not in marks
        assert marks[1] == str(after)
    finally:
        _fork._callbacks.remove(mark)
