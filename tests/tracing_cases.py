"""A span exporter that works across processes, for the tracing tests: a prefork child's spans
are written to a file as JSON lines (one write in append mode each), which the test reads."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class FileExporter(SpanExporter):
    """Appends each span as a JSON line, from whichever process ends it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(
            json.dumps(
                {
                    "name": s.name,
                    "trace_id": s.context.trace_id,
                    "span_id": s.context.span_id,
                    "parent": None if s.parent is None else s.parent.span_id,
                    "kind": s.kind.name,
                    "status": s.status.status_code.name,
                    "description": s.status.description,
                    "events": [e.name for e in s.events],
                    "attributes": dict(s.attributes or {}),
                    "pid": os.getpid(),
                }
            )
            + "\n"
            for s in spans
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every span exported to `path` so far, in the order they were written."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
