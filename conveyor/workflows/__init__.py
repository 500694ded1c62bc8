"""Workflows: signatures, chains, groups and chords (see docs/workflows.md).

`canvas` builds them and sends their first tasks; `wire` is what travels in an envelope's
`workflow` field; `plan` turns a finished task into what follows it; `joins` keeps chords and
run claims in the result store; `results` is the group's handle.

The public names are re-exported by `conveyor`; this package imports nothing itself, so that
`conveyor.message` can read the wire format without loading the rest.
"""
