"""The prefork worker's parent on RabbitMQ: CPU time per delivery, beside the dispatch probe.

`python -m bench.parent_cpu` answers the question behind the worker's throughput on RabbitMQ:
with no-op tasks and 2 children, the parent process (consume, decode, check, hand to a child,
settle, ack) is the bottleneck, so its CPU time per delivery is the figure to cut, and it is far
less noisy on a shared machine than tasks/s. Not part of `make bench`; a tool for working on the
hot path.

Each round fills a fresh queue with N no-op tasks (`bench.rabbitmq_worker`'s app, late acks, no
results, the exactly-once ledger), starts `conveyor worker bench_app:app --pool prefork -c 2
--until-empty`, and polls the queue as `bench.rabbitmq_worker` does: the window runs from the
first poll that sees fewer than N ready to the first that sees none. The parent's CPU time
(user + system, from /proc/<pid>/stat) is read at both ends of the window, so start-up and
shutdown are not counted; per delivery = CPU in the window / tasks consumed in it.

`--probe` adds, in the same run and alternating, the dispatch probe beside the project
(`../shared/probes/parent_dispatch.py`, not part of the project; skipped with a notice when it is
absent), which reports its own tasks/s. `--profile DIR` records the parent with py-spy (it must be
on PATH) into DIR/conveyor-<round>.txt (collapsed stacks). `--conveyor-arg` passes options to
`conveyor worker`, `--env K=V` sets variables for publisher and worker (for example
CONVEYOR_QUEUE_MAX_PRIORITY=0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import ledger
from bench.rabbitmq_worker import (
    CONVEYOR_APP,
    POLL_S,
    ROOT,
    URL,
    BenchError,
    Probe,
    delete,
    kill_group,
    log_tail,
    make_peer,
    publish,
    start_worker,
    tree,
    wait_exit,
    wait_queued,
)

PROBE = ROOT.parent / "shared" / "probes" / "parent_dispatch.py"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_s(pid) for pid in pids)


async def window(
    queue: str, n: int, worker: subprocess.Popen[bytes], workdir: Path
) -> tuple[float, float, float, int]:
    """Seconds from the first delivery to an empty queue, the parent's CPU in between, that of
    its children (the prefork children, which live through the window), and how many tasks
    left the queue in it."""
    async with Probe() as probe:
        first = cpu0 = kids0 = 0.0
        kids: list[int] = []
        before = n
        deadline = time.monotonic() + 120 + n / 100
        while True:
            ready = await probe.ready(queue)
            now = time.perf_counter()
            if not first and ready < n:
                first, cpu0, before = now, cpu_s(worker.pid), ready
                kids = [pid for pid in tree(worker.pid) if pid != worker.pid]
                kids0 = cpu_of(kids)
            if ready == 0:
                parent = cpu_s(worker.pid) - cpu0
                return now - first, parent, cpu_of(kids) - kids0, before
            if worker.poll() is not None:
                raise BenchError(f"the worker exited early:\n{log_tail(workdir)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{ready} of {n} tasks still queued at the deadline")
            await asyncio.sleep(POLL_S)


def conveyor_round(args: argparse.Namespace, label: str, tree_path: str | None) -> dict[str, Any]:
    queue = f"bench-parent-{uuid.uuid4().hex[:8]}"
    peer = make_peer("conveyor", queue, "prefork", True, args.conveyor_arg or ())
    env = dict(kv.split("=", 1) for kv in args.env or ())
    worker = spy = None
    with tempfile.TemporaryDirectory(prefix="bench-parent-") as tmp:
        workdir = Path(tmp)
        app = CONVEYOR_APP.replace("{settings}", "")
        source = app.format(url=URL, queue=queue) + ledger.TASK_SIDE
        (workdir / "bench_app.py").write_text(source)
        sys.path.insert(0, tmp)
        sys.modules.pop("bench_app", None)
        try:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            publish("conveyor", args.tasks)
            asyncio.run(wait_queued(queue, args.tasks))
            os.environ.update(ledger.fresh(workdir / "ledger"))
            worker = start_worker(peer, workdir, env, tree_path)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if args.profile:
                out = Path(args.profile) / f"conveyor-{label}.txt"
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(worker.pid),
                        "-o",
                        str(out),
                        "-r",
                        "500",
                        "-f",
                        "raw",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            seconds, cpu, kids, before = asyncio.run(window(queue, args.tasks, worker, workdir))
            code = asyncio.run(wait_exit(worker, 60))
            if code != 0:
                raise BenchError(f"worker exited with {code}:\n{log_tail(workdir)}")
            balance = ledger.verify(workdir / "ledger", args.tasks)
            if not balance.exact:
                raise BenchError(f"tasks not run exactly once: {balance.describe()}")
            us = 1e6 / before
            return {"per_s": before / seconds, "cpu_us": cpu * us, "children_us": kids * us}
        finally:
            sys.path.remove(tmp)
            if spy is not None:
                spy.wait(30)
            if worker is not None:
                kill_group(worker)
            asyncio.run(delete(peer))


def probe_round(args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(PROBE), str(args.tasks), "2", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return {"per_s": float(out.rsplit("process/s=", 1)[1].split()[0])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--profile", metavar="DIR")
    parser.add_argument("--conveyor-arg", action="append")
    parser.add_argument("--env", action="append", metavar="K=V")
    parser.add_argument(
        "--against",
        metavar="CHECKOUT",
        help="also run the worker of another checkout (e.g. a git worktree of main), alternating",
    )
    args = parser.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH")
    probe = args.probe and PROBE.exists()
    if args.probe and not probe:
        print(f"the probe is absent ({PROBE}): conveyor only", file=sys.stderr)
    trees: dict[str, str | None] = {"conveyor": None}
    if args.against:
        trees["against"] = str(Path(args.against).resolve())
    names = [*trees, *(["probe"] if probe else [])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for n in range(args.repeat):
        for who in names[n % len(names) :] + names[: n % len(names)]:
            if who == "probe":
                result = probe_round(args)
            else:
                result = conveyor_round(args, f"{who}-{n}", trees[who])
            runs[who].append(result)
            print(who, {k: round(v, 1) for k, v in result.items()}, flush=True)
    for who in names:
        rate = statistics.median(r["per_s"] for r in runs[who])
        line = f"{who}: {rate:,.0f} tasks/s"
        if who != "probe":
            cpu = statistics.median(r["cpu_us"] for r in runs[who])
            kids = statistics.median(r["children_us"] for r in runs[who])
            line += f", CPU per delivery: parent {cpu:.1f} µs, children {kids:.1f} µs"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
