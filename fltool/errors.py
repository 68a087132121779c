"""User-facing errors: the CLI prints their lines and exits 2, without a traceback."""


class FltoolError(Exception):
    """An error caused by the user's input (config, files, flags)."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class RoundAborted(FltoolError):
    """A round that could not finish and changed nothing (the model and state are as
    before it), such as a secure aggregation with too few live clients: the trainer
    draws the round again or skips it, as `clients.on_too_few` says."""
