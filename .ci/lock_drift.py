"""Print which installed packages differ from the versions in a uv lock file.

`make test-latest` runs this with the interpreter of the newest-releases environment, so its
report starts with what changed upstream since the lock was last refreshed (`make upgrade`).
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def main(lock_path: str) -> None:
    """Print the packages whose installed version is not the one `lock_path` pins."""
    lock = tomllib.loads(Path(lock_path).read_text(encoding="utf-8"))
    locked = {_canonical(p["name"]): p.get("version") for p in lock.get("package", [])}
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    changed = sorted(
        (name, locked[name], version)
        for name, version in installed.items()
        if name in locked and locked[name] is not None and locked[name] != version
    )
    if not changed:
        print(f"every package is at the version in {lock_path}")
        return
    width = max(len(name) for name, _, _ in changed)
    print(f"{len(changed)} packages differ from {lock_path} (locked -> testing now):")
    for name, old, new in changed:
        print(f"  {name:<{width}}  {old} -> {new}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "uv.lock")
