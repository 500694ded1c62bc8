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


def test_a_rabbitmq_worker_imports_no_importlib_metadata() -> None:
    # aiormq asks importlib.metadata for its own version at import; conveyor answers instead.
    out = run(
        """
        import sys
        import conveyor.cli
        from conveyor import Conveyor
        from conveyor.worker.pools import prefork
        app = Conveyor("t", broker="amqp://guest:guest@127.0.0.1:5672/")
        unused = ("importlib.metadata", "email", "zipfile", "csv")
        print("imported:", ",".join(name for name in unused if name in sys.modules))
        import aiormq.connection
        import importlib.metadata
        print(aiormq.connection.__version__ == importlib.metadata.version("aiormq"))
        """
    )
    assert out.splitlines() == ["imported: ", "True"]


def test_the_metadata_stand_in_hands_every_other_question_to_importlib_metadata() -> None:
    import importlib.metadata

    from conveyor.brokers.rabbitmq._aiormq import _MetadataStandIn, installed_version

    assert installed_version("aiormq") == importlib.metadata.version("aiormq")
    assert installed_version("no-such-package") is None
    stand_in = _MetadataStandIn("0.0.1")
    assert stand_in.version("aiormq") == "0.0.1"
    assert stand_in.version("msgspec") == importlib.metadata.version("msgspec")
    assert stand_in.PackageNotFoundError is importlib.metadata.PackageNotFoundError
    assert not hasattr(stand_in, "__path__")


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
