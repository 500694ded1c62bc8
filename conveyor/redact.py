"""Keeping credentials out of everything conveyor prints: logs, errors, reprs and tables."""

from __future__ import annotations

import logging
import re

# scheme://user:password@ anywhere in text. The password runs to the last "@" before the next
# white space, so one holding "@", "/", "?" or "#" unencoded is masked whole: when in doubt,
# more is masked, never less.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):\S*@")


def redact_text(text: str) -> str:
    """Mask the password of every URL in `text` as `***`; user names are kept for diagnosis."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


def redact_url(url: str) -> str:
    """The URL with its password masked, safe to print."""
    return redact_text(url)


class RedactingFilter(logging.Filter):
    """A last line of defence: masks URL passwords in log messages and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record with passwords masked; never fails the logging call."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a malformed call: let logging report it as it always does
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is printed masked.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True
