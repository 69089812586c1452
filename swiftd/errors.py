"""Typed errors, each bound to the gRPC status a caller sees.

Engines and servicers raise these; `swiftd.interceptor.ErrorInterceptor` turns them into statuses
in one place. Anything else becomes INTERNAL with a generic message (details go to the log).
"""

from __future__ import annotations

import grpc

#: Longest part of a caller's value echoed into a status message: statuses travel in metadata, and a
#: long id echoed whole overflows the caller's metadata limit (RESOURCE_EXHAUSTED instead of ours).
MAX_ECHO = 80


def shown(value: str) -> str:
    """`value` as a status message quotes it: repr, cut at MAX_ECHO characters."""
    if len(value) <= MAX_ECHO:
        return repr(value)
    return f"{value[:MAX_ECHO]!r}... ({len(value)} characters)"


class ServingError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    """A request field is malformed or out of range; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServingError):
    """An id (model, LoRA, ControlNet) names nothing this service knows."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, field: str, item_id: str):
        super().__init__(f"{field}: {shown(item_id)} not found")
        self.field = field
        self.item_id = item_id


class FailedPrecondition(ServingError):
    """The request is well formed but cannot apply here (e.g. a LoRA for another base model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServingError):
    """A downstream worker cannot be reached or died mid-request."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    """The caller went away; work for it stopped."""

    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(ServingError):
    """Admission control refused the request (queue full)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(ServingError):
    """The caller may not have this done here (e.g. dial an address that is not a configured peer)."""

    code = grpc.StatusCode.PERMISSION_DENIED


def from_rpc_error(exc: grpc.RpcError, where: str) -> ServingError:
    """A downstream call's failure as our own error, to pass on to our caller: the one mapping of
    every service's outgoing calls. The message starts with `where` the call went.

    The downstream verdict on the request (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
    RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) keeps its code. A downstream service that cannot be
    reached, or cancelled the call itself (e.g. while shutting down), is UNAVAILABLE (worth a
    retry); a downstream bug stays INTERNAL (not worth one), carrying its incident id.
    """
    code, details = exc.code(), exc.details() or ""
    if code in (None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{where}: {code.name.lower() if code else 'failed'}: {details}")
    error = ServingError(f"{where}: {details}")
    error.code = code
    return error
