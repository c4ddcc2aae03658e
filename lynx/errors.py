"""User-facing errors: each one names the problem and the fix, so callers never see torch internals.

A message names the options it is about with `option(name, value)`, written once: `str(error)` shows them as
Python keyword arguments (`num_frames=10`), the command line as its flags (`--frames 10`, via `render`), so
each interface speaks its own words.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, Callable

_UNSET: Any = object()
# Control characters that never occur in a message's own text mark an option reference.
_OPTION = re.compile("\x1f(\\w+)(?:\x1e(.*?))?\x1f", re.S)


def option(name: str, value: Any = _UNSET) -> str:
    """A reference to the call option `name` (given `value`) inside an error message."""
    if value is _UNSET:
        return f"\x1f{name}\x1f"
    if hasattr(value, "item"):  # numpy scalars read as the Python numbers they are
        value = value.item()
    if not isinstance(value, (str, int, float, bool)) or value is None:
        value = str(value)
    return f"\x1f{name}\x1e{json.dumps(value)}\x1f"


def render(text: str, flag: Callable[[str], str] | None = None, sep: str = " ") -> str:
    """`text` with its option references as Python keywords (`name=value`), or as the names `flag(name)` gives
    (`--flag value`, or `key=value` with `sep="="`; a switch given True is the flag alone)."""

    def show(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if flag is None:
            return name if value is None else f"{name}={json.loads(value)!r}"
        if value is None or json.loads(value) is True:
            return flag(name)
        value = json.loads(value)
        if sep != " ":
            return f"{flag(name)}{sep}{value!r}"
        return f"{flag(name)} {shlex.quote(value) if isinstance(value, str) else value}"

    return _OPTION.sub(show, text)


class LynxError(Exception):
    """Base class for every error this package raises on purpose."""

    def __str__(self) -> str:
        return self.render()

    def render(self, flag: Callable[[str], str] | None = None, sep: str = " ") -> str:
        """The message in Python's words, or with `flag(name)` for each option it names (the command line)."""
        return render(str(self.args[0]) if len(self.args) == 1 else Exception.__str__(self), flag, sep)


class WeightsNotFoundError(LynxError, FileNotFoundError):
    """A model file the user has to download is missing; the message says what and where."""


class CheckpointError(LynxError, ValueError):
    """A weight file exists but does not hold what the model expects (keys, shapes, corruption)."""


class InputError(LynxError, ValueError):
    """A call argument or input file is unusable (sizes, paths, images)."""


class SettingsError(InputError):
    """A generation setting (`GenerationSettings`) is invalid; raised before anything is loaded or computed."""


class NoFaceError(InputError):
    """No usable face was found in a photo."""


class ParallelError(InputError):
    """A multi-process layout that cannot work: a world size that does not factor into the requested mesh,
    a sequence that does not split evenly over its ranks, a process-group backend without a needed collective."""


class UnsafeVideoError(LynxError):
    """The safety classifier flagged a generated video, so it was not written; `verdict` holds the scores."""

    def __init__(self, message: str, verdict: dict | None = None):
        super().__init__(message)
        self.verdict = verdict or {}


class OutputError(InputError):
    """An output cannot be written (a folder that is a file, no permission, no space, a failed encode)."""


class EnvironmentProblem(InputError):
    """The machine cannot do what was asked (no CUDA, an attention backend that is not installed)."""
