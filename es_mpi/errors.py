"""The one exception type for bad input: the CLI prints its message as a single line."""


class EsError(Exception):
    """A problem with the user's input or files; the message names it and the fix."""
