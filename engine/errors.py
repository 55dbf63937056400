"""Errors a user can cause. Each carries a message that says what happened and what to do."""


class TsdpoError(Exception):
    """Base class: the message is shown as-is in the CLI and in the studio's error dialog."""


class ModelLoadError(TsdpoError):
    pass


class DataError(TsdpoError):
    pass


class StoreError(TsdpoError):
    pass


class Cancelled(TsdpoError):
    """Raised inside a long job when the user asked it to stop."""

    def __init__(self, what: str = "the job"):
        super().__init__(f"Stopped: {what} was cancelled.")
