"""The project's exception family.

Every error a user can act on is a :class:`PortableMoEError`. The CLI prints its message as one
line and exits with the error's ``exit_code``; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations


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


class BackendUnavailableError(BackendError):
    """A backend is registered but cannot run on this machine (the message says why)."""


class InputError(PortableMoEError):
    """Inputs given to a compiled model do not match what the model expects."""


class ConformanceError(PortableMoEError):
    """A backend's outputs disagree with the golden data."""

    exit_code = 1
