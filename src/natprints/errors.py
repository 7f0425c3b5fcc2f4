"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NatprintsError(Exception):
    """A user-facing error: bad input, a missing stage, a foreign or tampered artifact."""
