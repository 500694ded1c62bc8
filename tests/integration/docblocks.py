"""Runnable blocks in the docs: find them in a Markdown page and run them in a directory.

A block is runnable when an HTML comment, invisible on the rendered page, stands on the line
before its opening fence (blank lines between are allowed):

- `<!-- test: file NAME -->`: the block's text is written to NAME (relative to the page's
  directory), as a reader saves it: a `tasks.py`, a Dockerfile, a systemd unit.
- `<!-- test: run -->`: each command of the block runs in its own `bash -c`, in the page's
  directory, in page order, and must exit 0 (`run exit=N`: must exit with N). In a ```console
  block, lines starting with `$ ` are the commands and the lines after one, up to the next, are
  what it prints (stdout and stderr together, as a terminal shows them): the output must match,
  where `...` within a line stands for any text and a line of only `...` for any lines. In any
  other block every line is a command, and output is not compared. A line ending in a backslash
  continues on the next.
- `<!-- test: background -->`: each command starts in the background, for a worker the next
  blocks need. It must still be running after the page's last block; it then gets one SIGTERM,
  as a supervisor sends it, and must exit 0.

A comment of another kind, or one with no block after it, is an error: a typo in a marker must not
silently leave a block untested.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(r"<!--\s*test:\s*(?P<spec>.*?)\s*-->")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w-]*)")
COMMAND_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Command:
    """One command of a block, and what the page says it prints (None: not compared)."""

    text: str
    expected: str | None = None


@dataclass(frozen=True)
class Block:
    """A marked fenced block: its kind (`file`, `run`, `background`), where it starts, its text."""

    kind: str
    line: int
    lang: str
    text: str
    name: str = ""  # the file name, for `file`
    exit_status: int = 0  # for `run`

    def commands(self) -> list[Command]:
        """The block's commands, with their expected output in a console block."""
        if self.lang == "console":
            return _console_commands(self.text)
        return [Command(c) for c in _join_continuations(self.text.splitlines())]


def blocks(page: Path) -> list[Block]:
    """The marked blocks of a page, in order; `ValueError` for a marker that is not understood."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    pending: tuple[int, str] | None = None
    n = 0
    while n < len(lines):
        line = lines[n]
        marker = MARKER.fullmatch(line.strip())
        fence = FENCE.match(line)
        if marker:
            if pending is not None:
                raise ValueError(f"{page}:{pending[0]}: marker not followed by a block")
            pending = (n + 1, marker["spec"])
        elif fence:
            end = next(
                (i for i in range(n + 1, len(lines)) if lines[i].strip() == fence["fence"]), None
            )
            if end is None:
                raise ValueError(f"{page}:{n + 1}: unclosed code fence")
            if pending is not None:
                text = "\n".join(lines[n + 1 : end]) + "\n"
                found.append(_block(page, pending[0], pending[1], fence["lang"], text))
                pending = None
            n = end
        elif line.strip() and pending is not None:
            raise ValueError(f"{page}:{pending[0]}: marker not followed by a block")
        n += 1
    if pending is not None:
        raise ValueError(f"{page}:{pending[0]}: marker not followed by a block")
    return found


def _block(page: Path, line: int, spec: str, lang: str, text: str) -> Block:
    kind, _, rest = spec.partition(" ")
    rest = rest.strip()
    if kind == "file" and rest:
        return Block("file", line, lang, text, name=rest)
    if kind == "run" and (not rest or re.fullmatch(r"exit=\d+", rest)):
        status = int(rest.removeprefix("exit=")) if rest else 0
        return Block("run", line, lang, text, exit_status=status)
    if kind == "background" and not rest:
        return Block("background", line, lang, text)
    raise ValueError(
        f"{page}:{line}: unknown marker 'test: {spec}' (known: file NAME, run, run exit=N, "
        "background)"
    )


def _join_continuations(lines: list[str]) -> list[str]:
    commands: list[str] = []
    current = ""
    for line in lines:
        current += line
        if current.endswith("\\"):
            current += "\n"
            continue
        if current.strip():
            commands.append(current)
        current = ""
    if current.strip():
        commands.append(current)
    return commands


def _console_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    command: list[str] = []
    output: list[str] = []
    continuing = False

    def flush() -> None:
        if command:
            commands.append(Command("\n".join(command), "\n".join(output)))

    for line in text.splitlines():
        if continuing:
            command.append(line)
        elif line.startswith("$ "):
            flush()
            command, output = [line[2:]], []
        elif command:
            output.append(line)
        else:
            raise ValueError(f"console block line before any command: {line!r}")
        continuing = command[-1].endswith("\\") if not output else False
    flush()
    return commands


def output_matches(expected: str, actual: str) -> bool:
    """Whether `actual` is what the page shows: `...` is any text in a line, or any lines alone."""
    pattern = []
    for raw in expected.rstrip().splitlines():
        line = raw.rstrip()
        if line == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            escaped = ".*?".join(re.escape(part) for part in line.split("..."))
            pattern.append(escaped + r"[ \t]*\n")
    text = "".join(line.rstrip() + "\n" for line in actual.rstrip().splitlines())
    return re.fullmatch("".join(pattern), text) is not None


@dataclass
class PageRun:
    """Runs a page's blocks in one directory with a given environment."""

    directory: Path
    env: dict[str, str]
    background: list[tuple[Block, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def run(self, page: Path) -> None:
        """Run every marked block of `page`, then stop what runs in the background."""
        with self._stopping_background():
            for block in blocks(page):
                where = f"{page.name}:{block.line}"
                if block.kind == "file":
                    target = self.directory / block.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(block.text)
                elif block.kind == "background":
                    for command in block.commands():
                        self._start(block, command.text)
                else:
                    for command in block.commands():
                        self._run(where, block.exit_status, command)
            self._stop_background(page)

    def _run(self, where: str, status: int, command: Command) -> None:
        self._check_background(where)
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command.text],
            cwd=self.directory,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        out = proc.stdout.decode(errors="replace")
        assert proc.returncode == status, (
            f"{where}: `{command.text}` exited with {proc.returncode}, not {status}:\n{out}"
            + self._background_logs()
        )
        if command.expected is not None:
            assert output_matches(command.expected, out), (
                f"{where}: `{command.text}` printed\n{out}\nwhere the page shows\n"
                f"{command.expected}"
            )

    def _start(self, block: Block, command: str) -> None:
        log = self.directory / f".background-{len(self.background)}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.directory,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group, so a failed test can kill it all
            )
        self.background.append((block, proc, log))

    def _check_background(self, where: str) -> None:
        for block, proc, log in self.background:
            assert proc.poll() is None, (
                f"{where}: the background command of line {block.line} exited early with "
                f"{proc.returncode}:\n{log.read_text()}"
            )

    def _stop_background(self, page: Path) -> None:
        self._check_background(f"{page.name}, after its last block")
        for block, proc, log in self.background:
            proc.send_signal(signal.SIGTERM)  # to the command only, as systemd's KillMode=mixed
            status = proc.wait(timeout=STOP_TIMEOUT_S)
            assert status == 0, (
                f"{page.name}:{block.line}: the background command exited with {status} after "
                f"SIGTERM:\n{log.read_text()}"
            )

    def _background_logs(self) -> str:
        return "".join(
            f"\n--- background {block.line} ---\n{log.read_text()}"
            for block, _, log in self.background
        )

    @contextmanager
    def _stopping_background(self) -> Iterator[None]:
        try:
            yield
        finally:
            for _, proc, _ in self.background:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
