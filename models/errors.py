"""The one exception type a user can cause and fix."""


class LakelensError(Exception):
    """A mistake a user can fix (bad path, bad flag, missing weights).

    The CLI prints the message as one line and exits non-zero; no traceback.
    """
