"""The sink URL, parsed once: `parse_sink_url` makes the `SinkUrl` that the settings, the
stores, the flow and the demo read (which database system, which SQLite file, the form
that may be shown).

Accepted: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, and
`postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE[?...]` (also `postgres://`), scheme
in any case. No error message repeats the URL: it may hold a password. No heavy imports
either: the settings of every command use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
SYSTEMS = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}
"""URL scheme -> database system (the OpenTelemetry `db.system` value)."""
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class SinkUrl:
    """A parsed sink URL. `str()` and `repr()` show `redacted`, never the password."""

    url: str = field(repr=False)
    """The URL with its scheme in lower case: what the database driver is given."""
    scheme: str
    """`sqlite`, `postgresql` or `postgres`."""
    system: str
    """`sqlite` or `postgresql`."""
    path: Path | None
    """The SQLite file (relative to the working directory unless absolute); None for
    PostgreSQL."""
    redacted: str
    """The URL with any password masked: the only form that is logged or shown."""

    def __str__(self) -> str:
        return self.redacted


def parse_sink_url(url: str) -> SinkUrl:
    """`url` parsed; ValueError, without the URL in its message, unless it is
    `sqlite:///PATH` or a well-formed `postgresql://` / `postgres://` URL."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SYSTEMS:
        raise ValueError("not a sqlite:/// or postgresql:// URL")
    normal = f"{scheme}://{rest}"
    if scheme == "sqlite":
        if not rest.startswith("/") or rest in ("/", "//") or rest.endswith("/"):
            raise ValueError("a sqlite URL needs a file path after sqlite:///")
        return SinkUrl(normal, scheme, "sqlite", Path(rest[1:]), normal)
    try:
        port = urlsplit(url).port
    except ValueError:
        raise ValueError("the port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    if _BAD_PERCENT.search(rest):
        raise ValueError("has a % that is not followed by two hex digits")
    return SinkUrl(normal, scheme, "postgresql", None, redact_url(normal))


def redact_url(url: str) -> str:
    """`url` with any password (user info or `password=` query parameter) masked; a URL
    with nothing to mask comes back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{url.split(':', 1)[0]}://{MASK}"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = f"{userinfo.split(':', 1)[0]}:{MASK}"
        netloc = f"{userinfo}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(key, MASK if key.lower() == "password" else value) for key, value in pairs],
            safe="*",
        )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to mask; urlunsplit would also drop sqlite's empty host
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_passwords(url: str) -> list[str]:
    """The passwords written in `url`, raw and percent-decoded, longest first (to mask
    them in a driver's message that quotes them)."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    userinfo = parts.netloc.rpartition("@")[0]
    if ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() == "password":
            found.append(value)
    for value in list(found):
        found.append(unquote(value))
    return sorted({value for value in found if value}, key=len, reverse=True)
