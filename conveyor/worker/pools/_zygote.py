"""A prefork zygote in a fresh interpreter: `python -m conveyor.worker.pools._zygote SPEC`.

The worker starts one when its zygote died (see `_children.start_fresh_zygote`). It imports the
app by path, says `R` (ready) or `E` and why not on its control socket, then serves as the first
zygote does.
"""

from __future__ import annotations

import signal
import socket
import sys

# First of all: SIGINT and SIGTERM are the worker's to handle (a Ctrl-C reaches the whole group).
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

import msgspec  # noqa: E402

from conveyor import log  # noqa: E402
from conveyor.redact import redact_text  # noqa: E402
from conveyor.worker.pools._children import ZygoteSpec, serve_zygote, trim_heap  # noqa: E402

#: The longest reason sent back: a packet, and a line in the worker's log.
MAX_REASON = 2000


def main(argv: list[str]) -> int:
    """Import the app, report, then fork children until the worker closes the socket."""
    spec = msgspec.json.decode(argv[1], type=ZygoteSpec)
    control = socket.socket(fileno=spec.control)
    try:
        sys.path[:] = spec.sys_path
        from conveyor.app import load_app

        app = load_app(spec.app)
        # After the import, as in the worker: handlers the app's module put on the root logger
        # are the user's configuration there, so they must be here too.
        if spec.log_spec is not None:
            how = spec.log_spec
            log.setup(how.level, config=how.config, level_given=how.level_given)
    except BaseException as exc:  # whatever stops the import, the worker hears why
        reason = redact_text(f"{type(exc).__name__}: {exc}")[:MAX_REASON]
        control.send(b"E" + reason.encode(errors="replace"))
        return 1
    trim_heap()  # what the imports freed is not handed down to every child
    control.send(b"R")
    serve_zygote(control, app, spec.options())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
