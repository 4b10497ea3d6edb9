"""The one exception type that means "the user gave us something we cannot use".

The CLI turns a `UserError` into one line on stderr and exit status 2; anything else is a bug and keeps
its traceback. Raise it before creating or changing any output file.
"""

from __future__ import annotations

import json
from pathlib import Path

REDOWNLOAD = "download or save the model again"  # the fix for a damaged file of a published model


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


def first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (library messages can run to paragraphs)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; UserError naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{what} {path} is damaged (not valid JSON: {first_line(e)}); restore it: "
                        f"{REDOWNLOAD}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} is damaged (not a JSON object); restore it: {REDOWNLOAD}")
    return value
