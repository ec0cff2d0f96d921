"""The project's exception family.

Every error a user can act on is a :class:`PortableMoEError`. The CLI prints its message as one
line and exits with the error's ``exit_code``; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

from portable_moe._compat import StrEnum


class PortableMoEError(Exception):
    """Base class of every error portable-moe raises on purpose."""

    exit_code = 2


class ConfigError(PortableMoEError):
    """A model configuration or preset is invalid or unknown."""


class BundleError(PortableMoEError):
    """A bundle is missing, incomplete, tampered with or of an unknown format."""


class ExportError(PortableMoEError):
    """Exporting a model to ONNX failed, or the exported graph does not match torch."""


class ExportParityError(ExportError):
    """The exported graph computes something other than its source (torch or transformers)."""

    exit_code = 1


class BackendError(PortableMoEError):
    """A backend is unknown, unavailable, or failed to compile or run a model."""


class UnsupportedReason(StrEnum):
    """Why a runtime cannot run a model, as a code (code decides on it; the words are for people)."""

    NO_KERNEL = "no-kernel"
    """The runtime answered that it has no implementation for an operator at this opset or dtype."""
    UNKNOWN_OPERATOR = "unknown-operator"
    """The runtime's own operator registry has no schema for an operator (or its domain)."""
    DTYPE_NOT_CARRIED = "dtype-not-carried"
    """The runtime's Python binding cannot turn a numpy value of this dtype into its own (or back)."""
    DECLARED = "declared"
    """A backend's declared capabilities or simulated operator table refuse it (nothing was asked)."""


class UnsupportedError(BackendError):
    """The runtime itself says it cannot run this model: what was asked, and its answer.

    Adapters raise it from ``_compile`` or ``_run`` when their runtime answers that way (an
    exception class the runtime reserves for it, or a lookup in the runtime's own registry), with
    the runtime's words quoted; the op suite reports such a case as *unsupported*, not as an error.

    Attributes:
        code: the category (:class:`UnsupportedReason`).
    """

    def __init__(self, code: UnsupportedReason, message: str) -> None:
        super().__init__(message)
        self.code = UnsupportedReason(code)


class BackendUnavailableError(BackendError):
    """A backend is registered but cannot run on this machine (the message says why)."""


class InputError(PortableMoEError):
    """Inputs given to a compiled model do not match what the model expects."""


class ConformanceError(PortableMoEError):
    """A backend's outputs disagree with the golden data."""

    exit_code = 1
