"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""

import grpc


class UserError(Exception):
    """Bad input or environment, explained in the message (no traceback shown)."""


class LutError(UserError):
    """A failed lutstore call: `code` is the grpc.StatusCode, `message` the server's reason."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")
