"""The one exception type the command line turns into a one-line message."""


class AttnprobeError(Exception):
    """Bad input or state a user can fix; the message names the problem and the fix."""
