"""Errors a user can act on. The CLI prints their message as one line and exits non-zero;
anything else is a bug and, with ``rayfine --debug``, shows its traceback."""


class RayfineError(Exception):
    """Base of every error whose message tells the user what to change."""


class DataError(RayfineError, ValueError):
    """The dataset cannot be used as configured (bad rows, missing files, empty splits...)."""


class TrainingError(RayfineError, RuntimeError):
    """Training did not finish."""


class CheckpointError(RayfineError, ValueError):
    """A directory that is not a usable rayfine checkpoint."""


class InputError(RayfineError, ValueError):
    """One input (an image, a text) that cannot become a model input; serving answers 4xx."""
