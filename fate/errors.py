"""Every exception fate raises, in one tree.

``FateError`` is the root.  Below it, ``UserError`` is a mistake the user can fix — a missing or corrupt
file, an unknown architecture, a budget too small, a prompt too long, a bad option value: the command
layer (:mod:`fate.cli.common`) prints its message as one ``error: …`` line and exits with status 2.
Everything else (``EngineError``, ``ApiError``) is a failure of fate itself or of one request, and shows
a traceback (``--debug``) or an HTTP error.

The classes are grouped by where the mistake lies, not by the module that notices it, so no error needs
translating into another on its way up.  ``UserError`` is also a ``ValueError``: a wrong value is what
every one of them is, and code that validates with ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FateError(Exception):
    """Anything fate raises on purpose."""


class UserError(FateError, ValueError):
    """A mistake the user can fix; the message is one line naming the problem and the fix."""


class UsageError(UserError):
    """A command-line or API argument that is not valid (a size that is not a size, an empty list, ...)."""


# --- bundles and checkpoints -------------------------------------------------------------------------
class BundleError(UserError):
    """Anything wrong with a bundle file; the message names the part."""


class BundleStructureError(BundleError):
    """The container is malformed: a count, length, offset, shape or dtype in the header that does not fit
    the file or the rest of the header (a truncated file included)."""


class BundleMetadataError(BundleError):
    """A metadata value of the wrong type or out of range, or one that contradicts another value or the
    tensors."""


class BundleVersionError(BundleError):
    """A bundle format version this fate does not read."""


class ChecksumError(BundleError):
    """Bytes that do not match their stored crc32: the file is corrupt."""


class CheckpointError(UserError):
    """A Hugging Face checkpoint directory that cannot be converted."""


class ConfigError(UserError):
    """A model configuration that fate cannot run (bad or inconsistent values)."""


class UnsupportedArchitecture(ConfigError):
    """A model family or feature fate does not implement."""


class ConvertError(UserError):
    """A conversion that cannot proceed (output path, options, calibration text)."""


# --- running ------------------------------------------------------------------------------------------
class RequestError(UserError):
    """A request the runtime cannot serve: prompt too long or empty, bad sampling values, no CUDA, ..."""


class ContextFullError(RequestError):
    """The sequence no longer fits in the context (the KV cache is full)."""


class BudgetError(UserError):
    """A memory budget that cannot be met, or one that is not written as a size."""


class LinkError(UserError):
    """A --link value that is not a link."""


class TokenizerError(UserError):
    """A tokenizer that cannot be loaded or used."""


class ChatTemplateError(UserError):
    """The chat template could not be rendered (syntax error, raise_exception(), a budget exceeded, ...)."""


class ChatTemplateSecurityError(ChatTemplateError):
    """The chat template tried something the sandbox forbids (e.g. access to ``__class__``)."""


class EngineError(FateError, RuntimeError):
    """The engine failed while running (a transfer that died, no cache slot that can be freed): a bug or
    an environment problem, not the user's mistake."""


class ApiError(FateError):
    """A request to fate-serve that ends in an OpenAI-style JSON error with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
