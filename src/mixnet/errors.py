"""User-facing errors: the CLI prints these as one line and exits with a meaningful code."""

import importlib


class MixNetError(Exception):
    """A problem with the user's input (a file, a name, an argument), stated in one line."""

    exit_code = 2  # the command line's status for it; failures that are not the input's set their own


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (library errors often run to many), else its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def require(module: str, extra: str, purpose: str):
    """``import module`` (an optional dependency), or a MixNetError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MixNetError(f"{purpose} needs {module}: pip install 'mixnet[{extra}]'") from None
