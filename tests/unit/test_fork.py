"""Nothing network- or file-bound crosses a fork: a child opens its own SQLite connections."""

from __future__ import annotations

import os
from pathlib import Path

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
