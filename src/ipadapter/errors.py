"""One exception hierarchy for everything a user can get wrong.

Every message says what was received, what was expected and what to do. The CLI prints ``str(error)``
on one line and exits non-zero.
"""

from __future__ import annotations


class IPAdapterError(Exception):
    """Base class of every error this library raises on purpose."""

    exit_code = 2


class CheckpointError(IPAdapterError):
    """A file is not a readable IP-Adapter checkpoint."""


class IncompatibleModelError(IPAdapterError):
    """An adapter, image encoder or base model do not fit together."""


class InputError(IPAdapterError):
    """A reference image, mask or option value is not usable."""


class ModelNotAvailableError(IPAdapterError):
    """A model is neither on disk nor reachable (offline, or no such repository)."""
