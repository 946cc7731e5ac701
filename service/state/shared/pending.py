"""A change on its way through the group commit, and the error of a database away."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ...core.errors import UnavailableError
from ..changes import Change, Folded


class DatabaseUnavailableError(UnavailableError):
    """The state database cannot take changes now; nothing of the change was applied."""


@dataclass
class Pending:
    change: Change
    body: bytes
    done: threading.Event = field(default_factory=threading.Event)
    result: Folded | None = None
    error: BaseException | None = None

    def settle(self, result: Folded | None = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()

    def wait(self) -> Folded:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"the state database cannot be reached ({text[0] if text else type(exc).__name__})"
