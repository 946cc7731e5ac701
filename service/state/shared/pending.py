"""A change on its way through the group commit, and the error of a database away."""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from ...core.errors import UnavailableError
from ..changes import Change, Folded


class DatabaseUnavailableError(UnavailableError):
    """The state database cannot take changes now; nothing of the change was applied."""


@dataclass
class Pending:
    change: Change
    body: bytes
    future: Future = field(default_factory=Future)  # the change's Folded, once applied here

    def settle(self, result: Folded | None = None, error: BaseException | None = None) -> None:
        """The first settle wins (the writer and the follower may both get to a change)."""
        try:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        except InvalidStateError:
            pass


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"the state database cannot be reached ({text[0] if text else type(exc).__name__})"
