"""User-facing errors: the CLI prints these as one line and exits with a meaningful code."""


class MixNetError(Exception):
    """A problem with the user's input (a file, a name, an argument), stated in one line."""
