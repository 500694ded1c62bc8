"""The lock file: it matches pyproject.toml, and `make` refuses, in one line, when it does not.

These run the Makefile's own uv (`.venv-uv/bin/uv`, which `make test` installs first) on copies
of the project's files, never on the checkout itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".venv-uv" / "bin" / "uv"
ONE_LINE = "uv.lock does not match pyproject.toml: run 'make upgrade'"


@pytest.fixture
def uv() -> Path:
    if not UV.exists():
        message = f"{UV} is missing: `make test` installs it (this run did not come through make)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return UV


def project_copy(folder: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, folder / name)
    return folder


def test_the_committed_lock_matches_pyproject(uv: Path) -> None:
    done = subprocess.run(
        [uv, "lock", "--check"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"uv.lock is stale; run `make upgrade`:\n{done.stderr}"


def test_make_test_refuses_a_stale_lock_in_one_line(uv: Path, tmp_path: Path) -> None:
    project = project_copy(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('    "rich>=13",\n', '    "rich>=13",\n    "six>=1.16",\n'))
    assert pyproject.read_text() != text, "the test's edit of pyproject.toml did not apply"
    done = subprocess.run(
        ["make", "--no-print-directory", "test", f"UV={uv}"],
        check=False,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode != 0
    ours = [
        line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)
    ]
    assert ours == [ONE_LINE], done.stderr
    assert done.stdout == ""
    assert not (project / ".venv").exists(), "nothing is installed from a stale lock"
