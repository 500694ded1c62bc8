"""Side-by-side benchmarks of conveyor against other task queues (`python -m bench`).

Each peer is measured by its own runner script in its own subprocess, so neither shares an
interpreter, imports or a database with the other; see bench/README.md.
"""
