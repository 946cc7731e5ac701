"""Who may do what: the bearer token checks every transport applies the same way.

With a token configured, state changes need it; with reads protected, reads need it too.
A token that is sent must be right even where none is needed (``early``): a client with a
stale token learns at once. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from .errors import InvalidTokenError, MissingTokenError


def check_bearer(expected: str, authorization: str | None) -> None:
    """``authorization`` (an ``Authorization`` header's value) must carry ``expected``."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise MissingTokenError
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise InvalidTokenError


class Access:
    """The token rules of one server: ``token`` None means everything is open."""

    def __init__(self, token: str | None, protect_reads: bool = False) -> None:
        self._token = token
        self._protect_reads = protect_reads

    def write(self, authorization: str | None) -> None:
        if self._token is not None:
            check_bearer(self._token, authorization)

    def read(self, authorization: str | None) -> None:
        if self._protect_reads:
            self.write(authorization)

    def early(self, authorization: str | None) -> None:
        """What can be told before the request's mode is known."""
        if self._token is not None and (self._protect_reads or authorization is not None):
            check_bearer(self._token, authorization)

    def for_mode(self, mode: str, authorization: str | None) -> None:
        """Train changes state and needs write access; eval needs read access."""
        if mode == "train":
            self.write(authorization)
        else:
            self.read(authorization)
