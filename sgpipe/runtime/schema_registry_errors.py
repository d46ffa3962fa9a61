"""The schema registry's error, apart from its client so the error table can name it."""

from __future__ import annotations


class SchemaRegistryError(Exception):
    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def retriable(self) -> bool:
        """Unreachable or a server error: try again. Anything else needs a person."""
        return self.status is None or self.status >= 500 or self.status == 429
