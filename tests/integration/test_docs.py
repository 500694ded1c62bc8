"""The documented commands run: every marked block of the README and docs/ (see docblocks.py).

Each page runs in a fresh directory against the embedded SQLite broker, with this environment's
`bin` on PATH and `.venv` linked to it (the README writes `.venv/bin/conveyor`), no `CONVEYOR_*`
variables, and `CONVEYOR` set to this clone, for pages that build from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from docblocks import Block, PageRun, blocks, output_matches

from conveyor.settings import ENV_PREFIX

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted(
    (p for p in [README, *(ROOT / "docs").glob("*.md")] if "<!-- test:" in p.read_text()),
    key=lambda p: p.relative_to(ROOT),
)
UV = ROOT / ".venv-uv" / "bin" / "uv"


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail in CI, where every check must run."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def page_env(directory: Path) -> dict[str, str]:
    """The environment a page's commands run in, with `.venv` in `directory` linked to ours."""
    (directory / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(ENV_PREFIX) and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["CONVEYOR"] = str(ROOT)
    env["COLUMNS"] = "100"  # rich's tables, the same width wherever the tests run
    env["NO_COLOR"] = "1"
    env["UV_OFFLINE"] = "1"  # the deployment page's uv commands: from the cache, never the index
    return env


def run_page(page: Path, directory: Path) -> None:
    if ".venv-uv/bin/uv" in page.read_text() and not UV.exists():
        skip_or_fail(f"{page.name} uses {UV}, which `make .venv/bin/.installed` installs")
    PageRun(directory, page_env(directory)).run(page)


def file_block(page: Path, name: str) -> Block:
    found = [b for b in blocks(page) if b.kind == "file" and b.name == name]
    assert len(found) == 1, f"{page.name} has {len(found)} blocks saved as {name}"
    return found[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run(page: Path, tmp_path: Path) -> None:
    run_page(page, tmp_path)


@pytest.mark.parametrize("page", [README], ids=lambda p: p.name)
def test_the_pages_that_promise_runnable_commands_have_them(page: Path) -> None:
    kinds = {b.kind for b in blocks(page)}
    assert "run" in kinds, f"{page.name} has no block marked <!-- test: run -->"
    assert page in PAGES


# The harness itself.


@pytest.mark.parametrize(
    ("expected", "actual", "matches"),
    [
        ("5", "5\n", True),
        ("5", "6\n", False),
        ("...\n5", "id\n5\n", True),
        ("...\n5", "5\n", True),
        ("task ... failed", "task 01ab failed\n", True),
        ("task ... failed", "task 01ab failed\nmore\n", False),
        ("", "", True),
        ("", "something\n", False),
        ("a  ", "a\n", True),  # trailing spaces, as rich pads table rows
    ],
)
def test_output_matching(expected: str, actual: str, matches: bool) -> None:
    assert output_matches(expected, actual) is matches


def test_blocks_and_commands_are_parsed(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- test: file app.py -->\n```python\nx = 1\n```\n\n"
        "<!-- test: run exit=1 -->\n\n```console\n$ echo a \\\n  b\na b\n$ true\n```\n"
        "```\nnot marked\n```\n<!-- test: background -->\n```\nsleep 1\n```\n"
    )
    found = blocks(page)
    assert [(b.kind, b.name, b.exit_status) for b in found] == [
        ("file", "app.py", 0),
        ("run", "", 1),
        ("background", "", 0),
    ]
    assert found[0].text == "x = 1\n"
    commands = found[1].commands()
    assert [(c.text, c.expected) for c in commands] == [("echo a \\\n  b", "a b"), ("true", "")]


@pytest.mark.parametrize(
    "text",
    [
        "<!-- test: runn -->\n```\ntrue\n```\n",
        "<!-- test: run -->\nprose, not a block\n```\ntrue\n```\n",
        "<!-- test: run -->\n",
        "<!-- test: file -->\n```\nx\n```\n",
    ],
)
def test_a_marker_that_is_not_understood_is_an_error(tmp_path: Path, text: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(ValueError, match=r"page\.md:1"):
        blocks(page)
