"""The bad-input corpus: messages a worker must dead-letter with a reason (see README.md)."""
