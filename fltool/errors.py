"""User-facing errors: the CLI prints their lines and exits 2, without a traceback."""


class FltoolError(Exception):
    """An error caused by the user's input (config, files, flags)."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)
