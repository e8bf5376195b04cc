"""The one error the cost tools raise: a problem worth one line to the user."""

from __future__ import annotations


class CostError(Exception):
    """Bad pricing data, an unreadable benchmark file, or inputs that cannot be planned for."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
