"""User-facing errors: each one names the problem and the fix, so callers never see torch internals."""


class LynxError(Exception):
    """Base class for every error this package raises on purpose."""


class WeightsNotFoundError(LynxError, FileNotFoundError):
    """A model file the user has to download is missing; the message says what and where."""


class CheckpointError(LynxError, ValueError):
    """A weight file exists but does not hold what the model expects (keys, shapes, corruption)."""


class InputError(LynxError, ValueError):
    """A call argument or input file is unusable (sizes, paths, images)."""


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
