"""The named errors users meet. Each message names the argument or file, the value, and the fix."""

from __future__ import annotations


class InfusionError(Exception):
    """Base class of every error raised by diffusers-infusion."""


class ConceptFileError(InfusionError, OSError):
    """A concept file cannot be read: missing, truncated, corrupt, or a pickle (which is never unpickled)."""


class ConceptNotFoundError(ConceptFileError):
    """No concept file at that path, repository, revision or subfolder (or not in the cache when offline)."""


class ConceptFormatVersionError(ConceptFileError):
    """A concept file written in a newer file format than this library reads: upgrade diffusers-infusion."""


class ConceptMismatchError(InfusionError, ValueError):
    """A concept does not fit a UNet: unknown layer names, missing layers, or vectors of the wrong length."""


class ClassWordError(InfusionError, ValueError):
    """A concept's class word is missing, empty, or not in the tokenizer's vocabulary."""


class FileClassWordError(ClassWordError, ConceptFileError):
    """A concept file stores no usable class word (and none was passed): both a file and a class-word error."""


class UnknownConceptError(InfusionError, ValueError):
    """A concept name that is not loaded (or a duplicate adapter name on load)."""


class InfusionCallError(InfusionError, ValueError):
    """Bad per-call Infusion arguments: strengths, per-prompt concepts, token indices."""


class FidelityConfigError(InfusionError, ValueError):
    """A bad option of the fidelity knob (``FidelityConfig``): rank, timestep gate, layers, norm bound, strength."""
