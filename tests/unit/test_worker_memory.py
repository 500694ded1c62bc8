"""What every process of a prefork worker carries: nothing imported that it never uses, and no
free heap pages handed down by the fork (docs/benchmarks.md, idle memory).

Both run in a fresh interpreter: the test process has imported far more than a worker does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_worker_imports_no_logging_config_nor_difflib_until_they_are_needed() -> None:
    # What `conveyor worker` imports before its pool forks, without --log-config.
    out = run(
        """
        import sys
        import conveyor.cli
        from conveyor import Conveyor, log
        from conveyor.worker.pools import prefork
        app = Conveyor("t", broker="memory://")
        log.setup("INFO", config=None, level_given=False)
        unused = ("logging.config", "logging.handlers", "socketserver", "pickle", "difflib")
        print(",".join(name for name in unused if name in sys.modules))
        """
    )
    assert out == ""


def test_an_unknown_setting_still_gets_its_did_you_mean() -> None:
    from conveyor.settings import unknown_name_message

    assert "did you mean 'concurrency'?" in unknown_name_message(
        "concurency", ("concurrency", "pool"), "setting"
    )


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim, read through /proc")
def test_trim_heap_hands_freed_pages_back_before_a_fork() -> None:
    # 40 MB in 2 kB blocks (C-heap allocations, not mmaps), all freed but the last, which pins
    # the top of the heap: glibc keeps the pages until malloc_trim gives them back.
    out = run(
        """
        import os
        from conveyor.worker.pools._children import trim_heap

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        blocks = [bytes(2000) + bytes([i % 256]) for i in range(20_000)]
        last = blocks[-1]
        del blocks
        before = rss()
        trim_heap()
        print(before - rss())
        """
    )
    assert int(out) > 20_000_000
