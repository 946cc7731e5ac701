"""What can go wrong while serving, named by meaning. No status codes here: the one table
in ``service.http.errors`` turns these into REST and V2 replies.

    ServiceError
    ├── InvalidRequestError       the request asks for something wrong (a bad field, shape,
    │   │                         mode, name, configuration or device)
    │   └── MalformedRequestError the body cannot even be parsed (not JSON, not gzip, ...)
    ├── PayloadTooLargeError      a body over the size limit, sent or once decompressed
    ├── NotFoundError             no such layer (``LayerNotFoundError``), catalog model
    │                             (``ModelNotFoundError``) or V2 model version, or a layer
    │                             not served now (``LayerUnloadedError``)
    ├── ConflictError             a request_id already used for another input or layer
    ├── MissingTokenError         a token is required and none was sent
    ├── InvalidTokenError         the token sent is not the server's
    └── UnavailableError          the server cannot take the request now
        ├── NotReadyError         it is still loading its layers
        ├── KeyInFlightError      a retry's request_id is still being applied
        ├── JournalFailedError    (``service.state``) changes cannot be made durable
        └── RequestTimeoutError   it could not start in time (nothing applied)

normcore's own ``InputError`` (a tensor the layer cannot take) and ``CheckpointError`` (an
unusable checkpoint) count as invalid requests when a request caused them. Messages name
the problem and never echo raw client input (see ``shown``).
"""

from __future__ import annotations

import re

# A layer name: what a path may carry and what a message may repeat. \Z, not $: "$" also
# matches before a trailing newline.
NAME_PATTERN = r"[A-Za-z0-9._-]{1,128}"
NAME = re.compile(rf"^{NAME_PATTERN}\Z")


def shown(name: object) -> str:
    """A name from a request or file, fit to repeat in an error message: itself when it is
    a short plain name, else a placeholder (messages never echo arbitrary input)."""
    if isinstance(name, str) and len(name) <= 64 and NAME.match(name):
        return name
    return "(not shown)"


class ServiceError(Exception):
    """Base of the errors the service raises on purpose."""


class InvalidRequestError(ServiceError, ValueError):
    """The request is readable but asks for something the service refuses."""


class MalformedRequestError(InvalidRequestError):
    """The body cannot be parsed at all."""


class PayloadTooLargeError(ServiceError):
    """A body over the configured size limit (as sent, or once decompressed)."""


class BodyTooLargeError(PayloadTooLargeError):
    """The request body is over ``max_body_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")


class NotFoundError(ServiceError, LookupError):
    """Something the request names does not exist."""


class LayerNotFoundError(NotFoundError):
    """No layer of that name is served."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        if isinstance(self.name, str) and NAME.match(self.name):
            return f"unknown layer {self.name!r}"
        return f"unknown layer (names match {NAME_PATTERN})"


class ModelNotFoundError(NotFoundError):
    """No catalog ``[[model]]`` has that name_prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__(f"unknown model {shown(prefix)!r}; the catalog's [[model]] entries "
                         "name them by their name_prefix")


class LayerUnloadedError(NotFoundError):
    """The layer is kept, with its state, but not served (V2 repository unload)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' is unloaded: load it to serve it again "
                         f"(POST /v2/repository/models/{name}/load)")


class VersionNotFoundError(NotFoundError):
    """A model version other than the one there is."""


class ConflictError(ServiceError):
    """The request contradicts one seen before (a reused request_id)."""


class MissingTokenError(ServiceError):
    """The operation needs the bearer token and the request has none."""

    def __init__(self) -> None:
        super().__init__("missing bearer token")


class InvalidTokenError(ServiceError):
    """The bearer token does not match."""

    def __init__(self) -> None:
        super().__init__("invalid bearer token")


class UnavailableError(ServiceError):
    """The server cannot take this kind of request now."""


class NotReadyError(UnavailableError):
    """The server is still loading its layers."""

    def __init__(self, why: str | None = None) -> None:
        super().__init__("starting: catalog not loaded yet" + (f" ({why})" if why else ""))


class KeyInFlightError(UnavailableError):
    """A retry waited past its deadline for the first request with its request_id, which
    is still being applied."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the request with request_id '{shown(key)}' is still being "
                         "applied; retry later with the same request_id")


class RequestTimeoutError(UnavailableError):
    """A request could not start within the request timeout; nothing of it was applied (a
    request that has started is finished and answered)."""

    def __init__(self) -> None:
        super().__init__("the server is busy: the request could not start within the "
                         "request timeout, and nothing of it was applied")
