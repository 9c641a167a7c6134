"""The errors csi_kit raises, each carrying the CSI status code it stands for.

Backends, the engine and the Linux helpers raise these; the gRPC layer
(`csi_kit._grpc.errors`) is the single place that turns them into gRPC
status codes.  The code is kept as the *name* of a `grpc.StatusCode` so that
this module (imported by `csi_kit.linux`) does not depend on grpc.

Messages are shown to the caller: say what was wrong and with which value,
never include a secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "CSIError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "Aborted",
    "FailedPrecondition",
    "OutOfRange",
    "ResourceExhausted",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DeadlineExceeded",
    "CommandFailed",
]


class CSIError(Exception):
    """Base class: an error with a gRPC status code name and a message."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CSIError):
    """A request field is missing, malformed or unsupported."""

    code = "INVALID_ARGUMENT"


class NotFound(CSIError):
    """The named volume, snapshot, node or path does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(CSIError):
    """A name is already used by an object made from an incompatible request."""

    code = "ALREADY_EXISTS"


class Aborted(CSIError):
    """Another operation on the same volume or snapshot is still running."""

    code = "ABORTED"


class FailedPrecondition(CSIError):
    """The object exists but is in a state that does not allow the call."""

    code = "FAILED_PRECONDITION"


class OutOfRange(CSIError):
    """A requested size is outside what the backend supports."""

    code = "OUT_OF_RANGE"


class ResourceExhausted(CSIError):
    """No capacity, or not on this node: the caller may try elsewhere."""

    code = "RESOURCE_EXHAUSTED"


class Unimplemented(CSIError):
    """The RPC or feature is not supported by this driver or backend."""

    code = "UNIMPLEMENTED"


class Internal(CSIError):
    """An unexpected failure inside the driver."""

    code = "INTERNAL"


class Unavailable(CSIError):
    """The driver or its storage is temporarily unable to serve."""

    code = "UNAVAILABLE"


class DeadlineExceeded(CSIError):
    """An operation took longer than allowed."""

    code = "DEADLINE_EXCEEDED"


class CommandFailed(Internal):
    """A system tool exited non-zero; keeps argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:]
        detail = "; ".join(tail) if tail else "no output"
        super().__init__(f"{argv[0]} exited with status {returncode}: {detail}")
