"""The one exception type the command line turns into a one-line message."""


class AttnprobeError(Exception):
    """Bad input or state a user can fix; the message names the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what a one-line error quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
