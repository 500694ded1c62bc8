"""Keeping credentials out of everything conveyor prints: logs, errors, reprs and tables."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

# user:password@ inside any URL-looking text.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]*@")


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (the user name is kept for diagnosis)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """Mask the password of every URL found in free text."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


class RedactingFilter(logging.Filter):
    """A last line of defence: masks URL passwords in every log record that passes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the formatted message with passwords masked."""
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
