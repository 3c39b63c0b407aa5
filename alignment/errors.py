"""User errors: one clear line naming the place and what was expected, exit status 2."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in the user's input (file, row, config key, path); printed as one line, exit 2."""


def exit_on_user_error(fn):
    """Wrap a command-line entry point: a UserError becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            msg = " ".join(str(e).split("\n")) if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
