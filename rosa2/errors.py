"""The error the CLI prints without a traceback: bad input, a missing piece, a clear fix."""


class Rosa2Error(Exception):
    """A user-facing error. The message names the bad value (or missing piece) and what is expected."""
