"""The one exception type that means "the user gave us something we cannot use".

The CLI turns a `UserError` into one line on stderr and exit status 2; anything else is a bug and keeps
its traceback. Raise it before creating or changing any output file.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""
