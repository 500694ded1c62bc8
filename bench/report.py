"""The benchmark summary, `docs/benchmarks.md`, and its charts in `docs/img/`.

`python -m bench.report` (the last step of `python -m bench`) reads the figures every scenario
saved in `docs/bench-data/` and writes the summary: the machine, the commands, every target with
its ratio from one run, a chart per scenario, and links to each scenario's detailed report. It
runs nothing itself, so it can be rerun at any time; a scenario that never ran is listed as such.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import data
from bench.embedded import cpu_model

ROOT = data.ROOT
SUMMARY = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
COLORS = {  # per peer: the first series, then others of the same peer in lighter shades
    "conveyor": ("#2b6cb0", "#63b3ed", "#2c5282", "#90cdf4"),
    "Dramatiq": ("#dd6b20", "#f6ad55"),
    "Celery": ("#38a169", "#9ae6b4"),
    "Huey": ("#805ad5", "#b794f4"),
}


def colors(labels: list[str]) -> list[str | None]:
    """A color per series: the peer's, a shade apart for each further series of that peer."""
    used: dict[str, int] = {}
    out: list[str | None] = []
    for label in labels:
        peer = next((p for p in COLORS if label.startswith(p)), None)
        if peer is None:
            out.append(None)
            continue
        shades = COLORS[peer]
        out.append(shades[used.get(peer, 0) % len(shades)])
        used[peer] = used.get(peer, 0) + 1
    return out


# Where the time goes, from profiling (py-spy on the worker's parent, strace counts, and CPU
# time per process); see the closing notes of the prefork and benchmark issues. Kept by hand:
# a profile is not something this report can take during a benchmark run.
WHERE_THE_TIME_GOES = """\
On RabbitMQ, a prefork worker's parent process does all the broker work for its children: it
reads every delivery (three AMQP frames, parsed by aiormq and pamqp in Python), decodes and
checks the envelope, writes the job down a child's pipe, reads the outcome back and sends the
acks. Profiled with py-spy at 20,000 no-op tasks, that is about 130 µs of CPU per task in the
parent, of which roughly 45% is receiving deliveries (aiormq's frame reader and consumer
dispatch, pamqp's decoding), 15-20% system calls (pipe writes to the children, socket writes of
acks, epoll), and the rest conveyor's own bookkeeping. RabbitMQ itself spends 75-120 µs per task
on the same 2 cores, each child about 30 µs. So on this 2-core machine the parent's one core is
the ceiling, near 6,000-7,000 tasks/s; Dramatiq's two processes each parse their own deliveries,
on both cores. Short tasks already go down the pipes in batches of up to 32 and their acks go
together, which doubled the rate from about 2,300 tasks/s; what is left is per-delivery work in
the AMQP client.

Latency: conveyor's task starts about 1 ms later than Dramatiq's (p50 near 2.8 ms against
1.8-2.1 ms). The prefork pipe is not it: the threads pool measures the same. The sender hands
the message to its broker connection's own event-loop thread, whose writer task sends it, and
the worker takes each delivery through aiormq's frame reader and a task per delivery before it
reaches the pool: a few event-loop turns and thread wake-ups on each side. Enqueue-to-result
also includes the publisher confirm: conveyor's send returns only once RabbitMQ has the message
on disk (6-7 ms here), which the peers do not wait for by default.

Idle memory: the worker tree is four processes (the parent, the zygote that forks children, and
two children), about 29 MiB PSS with cached bytecode; read page by page (/proc/PID/pagemap), it
holds three things. First the parent's heap at the fork, about 18 MiB, shared by all four and
counted once: the interpreter and its imports, half of it code objects (asyncio with ssl, aiormq
with pamqp and yarl, click, msgspec, logging, conveyor). Then about 8 MiB of copies: CPython
3.11 writes to every object it touches (reference counts) and to every function it runs, and a
process that writes to a page it shares gets its own copy. The parent, which connects and
consumes, copies about 4.3 MiB; the zygote and each idle child 1.2-1.4 MiB (after-fork hooks,
start-up, the interpreter's own data). Last, about 4 MiB of shares of libpython, OpenSSL and
extension modules. Dramatiq's children import their own copies of everything (9.4 MiB private
each). The target of 0.7x Dramatiq (about 25 MiB) would leave 3 MiB for all the copies, less
than the parent makes alone. Handing the C heap's free pages back before the fork (malloc_trim)
matters without cached bytecode: compiling the imports leaves about 3 MiB of them, which every
process inherited and reused (PSS 33.3 to 30.2 MiB, RSS 113 to 100 MiB). logging.config,
imported only for --log-config, saves 0.7 MiB of RSS per process. aiormq, imported without
importlib.metadata (which it asks for its own version), saves 1.2 MiB of the shared heap; the
children skip conveyor's after-fork callbacks, which ran in the zygote, 0.45 MiB. Measured and
left out: freezing the collector's objects before the fork (idle children run no full
collection, nor did children that ran 30,000 tasks), forking the zygote before the broker's
client is imported (RSS 8 MiB less, PSS 2 MiB more: the parent's imports after the fork land in
pages it shares with the zygote), and a zygote in a fresh interpreter (PSS 11 MiB more).
"""


def bars(
    name: str,
    title: str,
    groups: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    *,
    log: bool = False,
) -> str:
    """A grouped bar chart saved as docs/img/NAME.png; the markdown that shows it."""
    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    width = 0.8 / max(len(series), 1)
    palette = colors(list(series))
    for i, (label, values) in enumerate(series.items()):
        offsets = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        drawn = ax.bar(offsets, values, width, label=label, color=palette[i])
        ax.bar_label(drawn, labels=[_short(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(IMG / f"{name}.png")
    plt.close(fig)
    return f"![{title}](img/{name}.png)"


def lines_chart(
    name: str,
    title: str,
    series: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    ylabel: str,
) -> str:
    """A line chart saved as docs/img/NAME.png; the markdown that shows it."""
    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    palette = colors(list(series))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label, color=palette[i])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(IMG / f"{name}.png")
    plt.close(fig)
    return f"![{title}](img/{name}.png)"


def _short(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


class Summary:
    """The summary's text, its targets table and the scenarios that have no figures."""

    def __init__(self) -> None:
        self.targets: list[tuple[str, str, str, bool]] = []  # what, figure, target, met
        self.sections: list[str] = []
        self.missing: list[str] = []
        self.commands: list[str] = []
        self.dates: list[str] = []
        self.versions: dict[str, str] = {}

    def target(self, what: str, ratio: float, target: str, met: bool) -> None:
        self.targets.append((what, f"{ratio:.2f}x", target, met))

    def section(self, *lines: str) -> None:
        self.sections.append("\n".join(lines))

    def note(self, figures: dict[str, Any]) -> None:
        versions = figures.get("versions")
        if isinstance(versions, dict):
            self.versions.update({str(k): str(v) for k, v in versions.items()})
        elif isinstance(versions, str):
            for part in versions.split(","):
                name, _, version = part.strip().partition(" ")
                if name and version:
                    self.versions[name] = version
        if "command" in figures:
            self.commands.append(str(figures["command"]).strip())
        if "date" in figures:
            self.dates.append(str(figures["date"]))


def embedded(s: Summary, f: dict[str, Any]) -> None:
    variants = f["variants"]
    groups, conveyor, huey = [], [], []
    for v in variants.values():
        groups.append(f"{v['label']}: processing")
        conveyor.append(v["median"]["conveyor"]["process_per_s"])
        huey.append(v["median"]["huey"]["process_per_s"])
        ratio = v["ratio"]["process_per_s"]
        s.target(f"Embedded SQLite, {v['label']}: processing ÷ Huey", ratio, "≥ 2x", ratio >= 2)
    for v in variants.values():
        groups.append(f"{v['label']}: enqueue")
        conveyor.append(v["median"]["conveyor"]["enqueue_per_s"])
        huey.append(v["median"]["huey"]["enqueue_per_s"])
    chart = bars(
        "embedded",
        f"Embedded SQLite broker, {f['tasks']:,} no-op tasks (tasks/s, log scale)",
        groups,
        {"conveyor": conveyor, "Huey": huey},
        "tasks/s",
        log=True,
    )
    s.section(
        "## Throughput on the embedded broker",
        "",
        chart,
        "",
        "conveyor's SQLite broker against Huey's SQLite storage: 2 threads in one process, and 2",
        "processes (conveyor's prefork pool; Huey's process workers). Details and the method:",
        "[benchmarks-embedded.md](benchmarks-embedded.md).",
    )


def worker(s: Summary, f: dict[str, Any]) -> None:
    label = f["labels"]
    rate, best, lean = f["rate"], f["best_dramatiq"], f["lean_dramatiq"]
    targets = f["targets"]
    for peer, goal in ((best, targets["dramatiq"]), ("celery", targets["celery"])):
        if "conveyor" in rate and peer in rate:  # a run of some modes only leaves others out
            ratio = rate["conveyor"] / rate[peer]
            s.target(f"RabbitMQ processing ÷ {label[peer]}", ratio, f"≥ {goal:g}x", ratio >= goal)
    pss = f["pss_mib"]
    if "conveyor" in pss and lean in pss:
        memory = pss["conveyor"] / pss[lean]
        goal = targets["memory"]
        s.target(f"Idle memory (PSS) ÷ {label[lean]}", memory, f"≤ {goal:g}x", memory <= goal)
    if "conveyor-observed" in rate and "conveyor" in rate and "observed" in targets:
        observed = rate["conveyor-observed"] / rate["conveyor"]
        goal = targets["observed"]
        s.target(
            "RabbitMQ processing, metrics and events on ÷ off",
            observed,
            f"≥ {goal:g}x",
            observed >= goal,
        )
    # conveyor's variants (the worker's loop, the queues' x-max-priority) are in the details.
    shown = [m for m in f.get("modes", list(rate)) if not m.startswith("conveyor-")]
    chart = bars(
        "rabbitmq-processing",
        f"RabbitMQ, {f['tasks']:,} no-op tasks, 2 worker processes, late acks (tasks/s)",
        ["processing"],
        {_peer_label(label[m]): [rate[m]] for m in shown},
        "tasks/s",
    )
    sections = [
        "## Processing on RabbitMQ",
        "",
        chart,
        "",
        "The probe is `parent_dispatch.py`: one aiormq parent feeding 2 forked children and",
        "nothing else, a bound for a prefork parent's transport and dispatch. conveyor's variants",
        "(the worker's loop, the queues' x-max-priority) ran in the same rounds; their figures,",
        "every ratio and the method:",
        "[benchmarks-rabbitmq-worker.md](benchmarks-rabbitmq-worker.md).",
    ]
    if pss:
        memory_chart = bars(
            "idle-memory",
            "Idle worker process tree (MiB)",
            ["PSS", "RSS"],
            {_peer_label(label[m]): [pss[m], f["rss_mib"][m]] for m in pss},
            "MiB",
        )
        sections += ["", "## Idle memory", "", memory_chart]
    s.section(*sections)


def enqueue(s: Summary, f: dict[str, Any]) -> None:
    rate = f["rate"]
    for peer, goal in f["targets"].items():
        ratio = rate["conveyor"] / rate[peer]
        s.target(f"RabbitMQ bulk enqueue ÷ {peer}", ratio, f"≥ {goal:g}x", ratio >= goal)
    chart = bars(
        "rabbitmq-enqueue",
        f"Bulk enqueue to RabbitMQ, {f['tasks']:,} tasks (tasks/s)",
        list(rate),
        {"tasks/s": list(rate.values())},
        "tasks/s",
    )
    s.section(
        "## Bulk enqueue on RabbitMQ",
        "",
        chart,
        "",
        "conveyor always publishes with confirms; the peers at their defaults and with confirms.",
        "Details: [benchmarks-rabbitmq.md](benchmarks-rabbitmq.md).",
    )


def results(s: Summary, f: dict[str, Any]) -> None:
    labels, base = f["labels"], f["baseline"]
    modes = list(f["sequential"])
    chart = bars(
        "result-round-trips",
        "Result round trips: send, run, get (round trips/s)",
        ["one at a time", f"{f['concurrent_tasks']:,} at once"],
        {labels[m]: [f["sequential"][m]["per_s"], f["concurrent"][m]["per_s"]] for m in modes},
        "round trips/s",
    )
    rows = [
        f"| {labels[m]} | {f['sequential'][m]['per_s']:,.0f} | "
        f"{f['sequential'][m]['median_ms']:.1f} | {f['concurrent'][m]['per_s']:,.0f} | "
        f"{f['concurrent'][m]['per_s'] / f['concurrent'][base]['per_s']:.2f}x |"
        for m in modes
    ]
    s.section(
        "## Result round trips",
        "",
        chart,
        "",
        "| Peer | one at a time (/s) | median (ms) | at once (/s) | at once ÷ Celery |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        "Details: [benchmarks-results.md](benchmarks-results.md).",
    )


def latency(s: Summary, f: dict[str, Any]) -> None:
    labels, median, target = f["labels"], f["median"], f["target"]
    peer = target["against"]
    s.target(
        f"Enqueue-to-start p50 ÷ {labels[peer]}",
        target["ratio"],
        f"≤ {target['at_most']:g}x",
        bool(target["met"]),
    )
    modes = list(median)
    chart = bars(
        "latency",
        "One task at a time to an idle worker (ms, lower is better)",
        ["to start, p50", "to start, p99", "to result, p50", "to result, p99"],
        {
            _peer_label(labels[m]): [
                median[m]["start_p50_ms"],
                median[m]["start_p99_ms"],
                median[m]["result_p50_ms"],
                median[m]["result_p99_ms"],
            ]
            for m in modes
        },
        "ms",
    )
    s.section(
        "## Latency",
        "",
        chart,
        "",
        "From just before the send to the task's first line, and to the sender's `get()`",
        "returning. conveyor's send returns once RabbitMQ confirmed the message (on disk), which",
        "its enqueue-to-result includes; the peers publish without confirms by default. Details:",
        "[benchmarks-latency.md](benchmarks-latency.md).",
    )


def scaling(s: Summary, f: dict[str, Any]) -> None:
    part = f["concurrency"]
    labels = f["labels"]
    series = {
        _peer_label(labels[m]): ([int(k) for k in rates], list(rates.values()))
        for m, rates in part["rate"].items()
    }
    chart = lines_chart(
        "scaling-concurrency",
        f"Processing rate against children, {part['tasks']:,} no-op tasks on RabbitMQ",
        series,
        "children (worker processes)",
        "tasks/s",
    )
    backlog = f["backlog"]
    verdict = backlog["verdict"]
    samples = backlog["samples"]
    memory = lines_chart(
        "scaling-backlog",
        f"Draining a backlog of {backlog['tasks']:,} messages: worker tree memory",
        {
            "conveyor RSS (MiB)": (
                [x["drained"] * 100 for x in samples],
                [x["rss_kib"] / 1024 for x in samples],
            ),
            "conveyor PSS (MiB)": (
                [x["drained"] * 100 for x in samples],
                [x["pss_kib"] / 1024 for x in samples],
            ),
        },
        "% of the backlog drained",
        "MiB",
    )
    flat = "does not grow" if verdict["flat"] else "**grows**"
    s.section(
        "## Scaling",
        "",
        chart,
        "",
        memory,
        "",
        f"A backlog of {backlog['tasks']:,} messages drained at {backlog['drain_per_s']:,.0f}"
        f" tasks/s by 2 children; the worker's memory {flat} with the backlog (peak RSS"
        f" {verdict['growth']:.2f}x the RSS at 5% drained). Details:"
        " [benchmarks-scaling.md](benchmarks-scaling.md).",
    )


def load_memory(s: Summary, f: dict[str, Any]) -> None:
    labels, medians = f["labels"], f["medians"]
    modes = list(medians)
    chart = bars(
        "memory-after-load",
        f"Worker tree RSS, idle and after {f['tasks']:,} tasks (MiB)",
        ["idle", f"after {f['tasks']:,}"],
        {
            _peer_label(labels[m]): [medians[m]["idle_rss_mib"], medians[m]["after_rss_mib"]]
            for m in modes
        },
        "MiB",
    )
    rows = [
        f"| {labels[m]} | {medians[m]['idle_rss_mib']:.1f} | {medians[m]['after_rss_mib']:.1f} |"
        f" {medians[m]['growth_rss_pct']:+.1f}% | {medians[m]['idle_pss_mib']:.1f} |"
        f" {medians[m]['after_pss_mib']:.1f} |"
        for m in modes
    ]
    s.section(
        "## Memory under load",
        "",
        chart,
        "",
        "| Worker | idle RSS (MiB) | after (MiB) | RSS growth | idle PSS (MiB) | after (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Details: [benchmarks-memory.md](benchmarks-memory.md).",
    )


def mix(s: Summary, f: dict[str, Any]) -> None:
    labels, medians = f["labels"], f["medians"]
    modes = list(medians)
    chart = bars(
        "mix",
        f"1 task in {f['long_every']} sleeps {f['long_s']:g} s: total time (s, lower is better)",
        ["total", "last short task started"],
        {
            _peer_label(labels[m]): [medians[m]["total_s"], medians[m]["last_short_start_s"]]
            for m in modes
        },
        "seconds",
    )
    progress = lines_chart(
        "mix-progress",
        "When the tasks started, over the run",
        {
            _peer_label(labels[m]): (list(range(len(points))), points)
            for m, points in f["progress_s"].items()
        },
        "% of the tasks started",
        "seconds since the first delivery",
    )
    s.section(
        "## A realistic mix",
        "",
        chart,
        "",
        progress,
        "",
        "With 2 slots, the long tasks alone take 10 s; what matters is whether short tasks",
        "wait behind them. Details: [benchmarks-mix.md](benchmarks-mix.md).",
    )


def short_tasks(s: Summary, f: dict[str, Any]) -> None:
    labels, medians, limits = f["labels"], f["medians"], f["limits"]
    kinds = f["kinds"]
    modes = list(labels)
    if "sleep" in kinds:
        share = medians["sleep"]["conveyor"]["share_of_limit"]
        goal = f["target_share"]
        s.target(
            f"2 ms sleeping tasks, 4 children: tasks/s ÷ the {limits['sleep']:,.0f}/s they allow",
            share,
            f"≥ {goal:g}x",
            share >= goal,
        )
    names = {"sleep": "2 ms sleep", "cpu": "2 ms CPU"}
    chart = bars(
        "short-tasks",
        "2 ms tasks on RabbitMQ, 4 slots (tasks/s)",
        [f"{names[k]} (limit {limits[k]:,.0f})" for k in kinds],
        {_peer_label(labels[m]): [medians[k][m]["per_s"] for k in kinds] for m in modes},
        "tasks/s",
    )
    s.section(
        "## Short tasks",
        "",
        chart,
        "",
        "Tasks about as long as a trip to the broker: does a child find its next task at hand?",
        "The CPU tasks share the machine's cores with the worker's own process and RabbitMQ.",
        "Details: [benchmarks-short-tasks.md](benchmarks-short-tasks.md).",
    )


def _peer_label(label: str) -> str:
    return label.replace("`", "")


def values(s: Summary, f: dict[str, Any]) -> None:
    send = f["send_now_us"] - f["send_before_us"]
    run = f["run_now_us"] - f["run_before_us"]
    s.section(
        "## What keeping values exact costs",
        "",
        "Every send checks that its arguments arrive exactly (or refuses them), every run converts",
        "annotated arguments and checks its result. With a check of its own in place of",
        f"`Signature.bind`, a send of `add(2, 3)` changed by {send:+.1f} µs and a run by",
        f"{run:+.1f} µs;",
        f"a 15-field annotated dataclass costs {f['rich_send_us']:.0f} µs to send and",
        f"{f['rich_run_us']:.0f} µs to convert and return. Details:",
        "[benchmarks-values.md](benchmarks-values.md).",
    )


def logging_cost(s: Summary, f: dict[str, Any]) -> None:
    rows = [
        f"| {f['labels'][name]} | {v['default']:,.0f} | {v['quiet']:,.0f} | {v['ratio']:.3f} |"
        for name, v in f["figures"].items()
    ]
    s.section(
        "## What default logging costs",
        "",
        "The worker's default logging (a line per task while few finish, summaries above that)",
        f"against `--quiet-tasks`, same run, {f['repeat']} rounds of {f['tasks']:,} no-op tasks:",
        "",
        "| Worker | Default, tasks/s | Quiet, tasks/s | Default ÷ quiet |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "Details: [benchmarks-logging.md](benchmarks-logging.md).",
    )


def chord(s: Summary, f: dict[str, Any]) -> None:
    target, median = f["target"], f["median"]
    s.target(
        "Chord send-to-callback, Celery ÷ conveyor",
        target["ratio"],
        f"≥ {target['at_least']:g}x",
        bool(target["met"]),
    )
    s.section(
        "## Chords",
        "",
        f"One chord of {f['members']:,} members, from just before the send to the callback's "
        "result in the sender's `get()` (seconds, lower is better):",
        "",
        "| Worker | send | send to callback |",
        "|---|---:|---:|",
        *(
            f"| {f['labels'][m]} | {median[m]['send_s']:.2f} | {median[m]['callback_s']:.2f} |"
            for m in median
        ),
        "",
        "Details: [benchmarks-chord.md](benchmarks-chord.md).",
    )


RENDERERS: dict[str, Callable[[Summary, dict[str, Any]], None]] = {
    "embedded": embedded,
    "enqueue": enqueue,
    "worker": worker,
    "latency": latency,
    "scaling": scaling,
    "load_memory": load_memory,
    "mix": mix,
    "short_tasks": short_tasks,
    "results": results,
    "values": values,
    "logging": logging_cost,
    "chord": chord,
}


def render(elapsed: float | None) -> str:
    s = Summary()
    for scenario, draw in RENDERERS.items():
        figures = data.load(scenario)
        if figures is None:
            s.missing.append(scenario)
            continue
        s.note(figures)
        draw(s, figures)
    out = [
        "# Benchmarks",
        "",
        "conveyor beside Dramatiq, Celery and (on the embedded broker) Huey, each installed into",
        "the bench environment only, against the same local services, every comparison a ratio",
        "of medians taken in the same run. Written by `make bench` (`python -m bench`) from the",
        "figures in [bench-data/](bench-data/); rerun it rather than editing this file.",
        "",
        f"Figures from {min(s.dates, default='?')} to {max(s.dates, default='?')} (UTC).",
    ]
    if elapsed is not None:
        out.append(f"`make bench` took {elapsed / 60:.1f} minutes end to end.")
    out += [
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(s.versions.items())),
        "- Settings: each scenario's report lists the exact worker commands and options.",
        "",
        "## Targets",
        "",
        "| What | Ratio (same run) | Target | Met |",
        "|---|---:|---|---|",
        *(f"| {w} | {r} | {t} | {'yes' if m else '**no**'} |" for w, r, t, m in s.targets),
        "",
    ]
    if any(not met for *_, met in s.targets):
        out += ["## Where the time goes", "", WHERE_THE_TIME_GOES]
    out += ["\n\n".join(s.sections), ""]
    if s.missing:
        out += ["## Not measured yet", "", *(f"- {name}" for name in s.missing), ""]
    out += [
        "## Commands",
        "",
        "```",
        "make bench          # every scenario, then this report (python -m bench)",
        *s.commands,
        "```",
        "",
    ]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--elapsed", type=float, help="seconds the whole run took")
    args = parser.parse_args()
    SUMMARY.write_text(render(args.elapsed), encoding="utf-8")
    print(f"wrote {SUMMARY} and the charts in {IMG} ({dt.datetime.now(dt.UTC):%H:%M} UTC)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
