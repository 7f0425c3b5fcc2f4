"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NatprintsError(Exception):
    """A user-facing error: bad input, a missing stage, a foreign or tampered artifact."""


def first_line(exc: BaseException) -> str:
    """An exception as one line: the first line of its message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
