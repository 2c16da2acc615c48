"""User-facing errors.

Every error a user can cause (bad input, bad settings, a model that does not exist, a gradient
that is not finite, out of memory) is raised as :class:`QloraGaError` with a one-line message that
says what is wrong and what to do. The command-line scripts print that line and exit with code 2.
"""


class QloraGaError(ValueError):
    """A problem the user can fix; ``str(err)`` is a one-line explanation with the fix."""
