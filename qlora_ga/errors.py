"""User-facing errors.

Every error a user can cause (bad input, bad settings, a model that does not exist, a gradient
that is not finite, out of memory) is raised as :class:`QloraGaError` with a one-line message that
says what is wrong and what to do. The command-line scripts print that line and exit with code 2.
"""


class QloraGaError(ValueError):
    """A problem the user can fix; ``str(err)`` is a one-line explanation with the fix."""


def did_you_mean(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the option closest to ``word``, or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def system_error_line(e: OSError | MemoryError) -> str:
    """The one line a command prints for an error of the system (disk full, permission, out of host memory)."""
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    where = getattr(e, "filename", None)
    return f"error: {msg}{f' ({where})' if where else ''}"
