"""Masking secrets in URLs before they reach a message or a log line."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url"]


def redact_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``.

    >>> redact_url("rediss://:pw@h:6380"), redact_url("redis://h:6379/0")
    ('rediss://:***@h:6380', 'redis://h:6379/0')
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparsable (e.g. a bad port): hide everything before the host
        return url.split("@", 1)[-1] if "@" in url else url
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
