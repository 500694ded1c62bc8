"""Where each benchmark scenario keeps its figures: `docs/bench-data/<scenario>.json`.

Every scenario script saves the medians, ratios and raw runs it reported, with the machine and
versions, so `python -m bench.report` can redraw the charts (`docs/img/`) and the summary in
`docs/benchmarks.md` without running anything again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "bench-data"


def save(scenario: str, payload: dict[str, Any]) -> Path:
    """Write a scenario's figures (JSON-encodable) and return the file."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{scenario}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


def load(scenario: str) -> dict[str, Any] | None:
    """A scenario's saved figures, or None if it has not run."""
    path = DATA / f"{scenario}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data
