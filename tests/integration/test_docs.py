"""The documented commands run: every marked block of the README and docs/ (see docblocks.py).

Each page runs in a fresh directory against the embedded SQLite broker, with this environment's
`bin` on PATH and `.venv` linked to it (the README writes `.venv/bin/conveyor`), no `CONVEYOR_*`
variables, and `CONVEYOR` set to this clone (the deployment page builds from it). The deployment
page's files are checked further: the systemd unit with `systemd-analyze verify` and against the
worker's shutdown, the environment file against the settings, and the container recipe by doing
what its Dockerfile does in a virtual environment (Docker itself cannot run here).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from docblocks import Block, PageRun, blocks, output_matches

from conveyor.cli import main
from conveyor.settings import ENV_PREFIX, Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CELERY = ROOT / "docs" / "coming-from-celery.md"
DEPLOYING = ROOT / "docs" / "deploying.md"
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


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployment page, run once: its directory is the container's build context."""
    directory = tmp_path_factory.mktemp("deploying")
    run_page(DEPLOYING, directory)
    return directory


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run(
    page: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if page == DEPLOYING:
        request.getfixturevalue("deployed")
    else:
        run_page(page, tmp_path)


@pytest.mark.parametrize("page", [README, CELERY, DEPLOYING], ids=lambda p: p.name)
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


# The deployment page's systemd unit and environment file.

UNIT = "shop-worker.service"
ENV_FILE = "shop-worker.env"


def unit_entries(text: str) -> dict[str, list[str]]:
    """`Section.Key` to its values, in order (systemd allows a key more than once)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def env_file_entries(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` knows every key and checks ExecStart's program, so the
    documented venv path is pointed at this environment's `conveyor` first."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("systemd-analyze is not installed (Debian: apt-get install systemd)")
    text = file_block(DEPLOYING, UNIT).text
    program = shlex.split(unit_entries(text)["Service.ExecStart"][0])[0]
    assert program.endswith("/bin/conveyor"), program
    unit = tmp_path / UNIT
    unit.write_text(text.replace(program, str(Path(sys.prefix) / "bin" / "conveyor")))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_the_systemd_unit_stops_the_worker_gracefully_and_restarts_it() -> None:
    entries = unit_entries(file_block(DEPLOYING, UNIT).text)
    service = {k.removeprefix("Service."): v[-1] for k, v in entries.items()}
    assert service["KillSignal"] == "SIGTERM"
    # The worker acts for its children: only it gets the SIGTERM, and SIGKILL reaches the rest
    # only after TimeoutStopSec.
    assert service["KillMode"] == "mixed"
    assert service["Restart"] in ("always", "on-failure")
    environment = env_file_entries(file_block(DEPLOYING, ENV_FILE).text)
    for assignment in entries.get("Service.Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            environment[key] = value
    grace = Settings.load(env=environment).shutdown_grace
    assert float(service["TimeoutStopSec"].removesuffix("s")) > grace + 5, (
        "systemd must wait longer than the worker's shutdown grace before it kills the worker"
    )
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "conveyor" and argv[1] == "worker", argv
    with main.make_context("conveyor", argv[1:]) as ctx:  # the options exist and parse
        worker = main.get_command(ctx, "worker")
        assert worker is not None
        worker.make_context("worker", argv[2:], parent=ctx)


def test_the_environment_file_names_only_settings_that_exist() -> None:
    """conveyor ignores an unknown CONVEYOR_* variable, so a typo here would pass unseen."""
    entries = env_file_entries(file_block(DEPLOYING, ENV_FILE).text)
    known = {ENV_PREFIX + name.upper() for name in Settings.__struct_fields__}
    assert entries and set(entries) <= known, set(entries) - known
    Settings.load(env=entries)  # and the values are valid


# The deployment page's container image.


def dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def image_files(instructions: list[tuple[str, str]], context: Path) -> dict[str, Path]:
    """Each file COPY puts into the image, by its path there, from the build context."""
    files: dict[str, Path] = {}
    workdir = "/"
    for word, rest in instructions:
        if word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            *sources, dest = shlex.split(rest)
            into = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
            dest = os.path.join(workdir, dest)
            for source in sources:
                matched = sorted(context.glob(source))
                assert matched, f"COPY {source}: no such file in the build context"
                for path in matched:
                    name = os.path.join(dest, path.name) if into else dest
                    files[os.path.normpath(name)] = path
    return files


def test_the_dockerfile_uses_what_the_page_builds(deployed: Path) -> None:
    instructions = dockerfile(file_block(DEPLOYING, "Dockerfile").text)
    words = [word for word, _ in instructions]
    base = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?", instructions[0][1])
    assert words[0] == "FROM" and base, instructions[0]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(n) for n in requires.removeprefix(">=").split("."))
    assert (int(base[1]), int(base[2])) >= minimum, f"{instructions[0][1]} is below {requires}"

    files = image_files(instructions, deployed)
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    copied_into = {os.path.dirname(name) for name in files}
    for token in shlex.split(runs):  # a path in a directory COPY filled names a copied file
        if os.path.dirname(token) in copied_into:
            assert any(fnmatch.fnmatch(name, token) for name in files), f"{token} is not copied"
    assert re.search(r"pip install [^&]*--require-hashes -r \S*requirements\.txt", runs), runs
    assert re.search(r"pip install [^&]*--no-deps \S*conveyor-\*\.whl", runs), runs

    settings = dict(instructions)
    assert settings["STOPSIGNAL"] == "SIGTERM"
    assert settings["USER"] not in ("root", "0")
    # The exec form: the worker itself gets the SIGTERM, not a shell that would not pass it on.
    command = json.loads(settings["CMD"])
    assert command[:2] == ["conveyor", "worker"]
    module = command[2].partition(":")[0]
    assert f"{settings['WORKDIR'].rstrip('/')}/{module}.py" in files, "the app is not in WORKDIR"


def test_the_container_image_runs_as_a_virtual_environment(deployed: Path, tmp_path: Path) -> None:
    """What the image would do, without Docker: the pinned requirements and the wheel installed
    into a fresh environment (uv, offline from its cache, in place of pip), the copied files in
    WORKDIR, and CMD run there with the image's ENV; a task sent to it runs, and it stops on
    SIGTERM with status 0."""
    if not UV.exists():
        skip_or_fail(f"{UV} is missing: `make .venv/bin/.installed` installs it")
    instructions = dockerfile(file_block(DEPLOYING, "Dockerfile").text)
    files = image_files(instructions, deployed)
    venv = tmp_path / "image"
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True)
    requirements = next(p for n, p in files.items() if n.endswith("requirements.txt"))
    wheel = next(p for n, p in files.items() if n.endswith(".whl"))
    for install in (["--require-hashes", "-r", requirements], ["--no-deps", wheel]):
        proc = subprocess.run(
            [UV, "pip", "install", "--quiet", "--offline", "--python", venv / "bin" / "python"]
            + [str(a) for a in install],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            skip_or_fail(f"cannot install offline from uv's cache: {proc.stderr.strip()}")

    settings = dict(instructions)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    for name, source in files.items():
        if name.startswith(settings["WORKDIR"].rstrip("/") + "/"):
            shutil.copy(source, workdir / name.removeprefix(settings["WORKDIR"].rstrip("/") + "/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for word, rest in instructions:
        if word == "ENV":
            env.update(w.split("=", 1) for w in shlex.split(rest))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    env["CONVEYOR_BROKER"] = f"sqlite:///{tmp_path}/data/queue.db"  # a volume, in the image

    command = json.loads(settings["CMD"])
    assert shutil.which(command[0], path=env["PATH"]) == str(venv / "bin" / command[0])
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen(command, cwd=workdir, env=env, stdout=sink, stderr=sink)
    try:
        module = command[2].partition(":")[0]
        sent = subprocess.Popen(
            ["conveyor", "send", f"{module}:app", f"{module}.add", "2", "3", "--wait", "60"],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        while sent.poll() is None:  # waiting for the result, unless the worker is gone
            if worker.poll() is not None:
                sent.kill()
                sent.wait()
                pytest.fail(f"the image's CMD exited with {worker.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        output = sent.communicate()[0]
        assert sent.returncode == 0, output + log.read_text()
        assert output.splitlines()[-1] == "5"
        worker.terminate()
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert "is loaded from" not in log.read_text()  # the app came from WORKDIR, not elsewhere


# Links.

LINK = re.compile(r"\]\((?!https?:|mailto:)(?P<path>[^)#\s]*)(?:#(?P<anchor>[^)\s]+))?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            heading = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", [README, CELERY, DEPLOYING], ids=lambda p: p.name)
def test_links_lead_to_pages_and_headings_that_exist(page: Path) -> None:
    for link in LINK.finditer(page.read_text()):
        target = (page.parent / link["path"]).resolve() if link["path"] else page
        assert target.exists(), f"{page.name}: {link[0]} leads nowhere"
        if link["anchor"]:
            assert link["anchor"] in anchors(target), f"{page.name}: no heading for {link[0]}"
