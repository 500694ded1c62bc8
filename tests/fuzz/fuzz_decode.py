"""A coverage-guided fuzz target for `conveyor.message.decode` (atheris, libFuzzer).

`decode` may refuse anything, but only with a `DecodeError` that has a reason; any other exception
is a crash. An envelope it accepts must encode again (a retry re-sends it) and decode back to
itself.

    python tests/fuzz/fuzz_decode.py -max_total_time=60 -max_len=4096 [CORPUS_DIR ...]

The bad-input corpus (tests/corpus/) seeds the first CORPUS_DIR, or a temporary one when none is
given; libFuzzer adds what it finds there. `decode.dict` beside this file is the dictionary
unless a -dict= is given. Other arguments are libFuzzer's (-help=1 lists them). A crash is saved
as `crash-<sha1>` (see -artifact_prefix) and reproduced by passing its path.

Only conveyor's own Python code is instrumented (msgspec is compiled), so coverage guides little;
the seeds and the dictionary do most of the steering.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the corpus

with atheris.instrument_imports(include=["conveyor"]):
    from conveyor.errors import DecodeError
    from conveyor.message import decode, encode

SEED_MAX_LEN = 4096
DICTIONARY = Path(__file__).with_name("decode.dict")
NO_SIZE_LIMIT = 2**62  # re-encoding checks encodability, not size


def test_one_input(data: bytes) -> None:
    """The property: only DecodeError (with a reason) escapes decode; an accepted envelope
    encodes and decodes back to itself."""
    try:
        envelope = decode(data)
    except DecodeError as exc:
        if not exc.reason:
            raise AssertionError("DecodeError without a reason") from exc
        return
    again = encode(envelope, max_size=NO_SIZE_LIMIT)
    if decode(again, max_size=NO_SIZE_LIMIT) != envelope:
        raise AssertionError(f"accepted envelope does not round-trip: {again[:200]!r}")


def seed(folder: Path) -> None:
    """Write the corpus bodies (up to SEED_MAX_LEN bytes) into `folder` as seed inputs."""
    from corpus.cases import seed_bodies

    folder.mkdir(parents=True, exist_ok=True)
    for name, body in seed_bodies(SEED_MAX_LEN):
        (folder / f"seed-{name}").write_bytes(body)


def main() -> None:
    argv = list(sys.argv)
    if not any(arg.startswith("-dict=") for arg in argv):
        argv.insert(1, f"-dict={DICTIONARY}")
    folders = [arg for arg in argv[1:] if not arg.startswith("-")]
    if folders:
        first = Path(folders[0])
        if first.is_dir() or not first.exists():
            seed(first)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="fuzz-decode-"))
        print(f"fuzz_decode: seeds and findings in {scratch}", file=sys.stderr)
        seed(scratch)
        argv.append(str(scratch))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
