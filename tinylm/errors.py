"""The one exception type tinylm raises for problems a user can fix, and the helpers its messages share.

The command line turns a `UserError` into a single `error: ...` line and a non-zero exit code; anything
else that escapes is a bug in tinylm and keeps its traceback. A message that repeats a value the user
gave goes through `shown`, so that a huge value (a config of a million paths, a 10,000-digit number)
makes a line of a few hundred characters, not gigabytes of stderr.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

SHOWN_CHARS = 200  # the most characters of one value a message repeats


class UserError(Exception):
    """Bad input, bad configuration or a missing file: the message says what and how to fix it."""


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple = 3, 8, 8, 8
_repr.maxstring = _repr.maxother = _repr.maxlong = SHOWN_CHARS


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """repr(value) for a message, at most `limit` characters (reprlib never builds the whole repr of a
    large list or string, so a huge value costs no more than a small one)."""
    try:
        text = _repr.repr(value)
    except ValueError:  # an int too long to print in decimal (Python refuses past 4,300 digits)
        text = f"<a {value.bit_length():,}-bit number>" if isinstance(value, int) else f"<a {type(value).__name__}>"
    text = text.replace("\n", "\\n")  # one line, whatever the value holds
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_folder(path: str | Path, what: str) -> None:
    """One line if `path`, or the first of its parents that exists, is a file where a folder must be
    (mkdir would say "File exists" or "Not a directory", which reads like a full disk)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists() or candidate.is_symlink():
            if candidate.is_dir():
                return
            if candidate == p:
                raise UserError(f"{what} {shown(str(p))} is a file, not a folder; name a folder")
            raise UserError(f"{what} {shown(str(p))} cannot be a folder: {shown(str(candidate))} is a file")
