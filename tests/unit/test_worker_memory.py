"""What every process of a prefork worker carries: nothing imported that it never uses
(docs/benchmarks.md, idle memory).

Both run in a fresh interpreter: the test process has imported far more than a worker does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
