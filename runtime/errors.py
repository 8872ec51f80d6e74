"""Typed errors. Every message names the bad value and what would have been accepted."""


class AudioLDM2Error(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(AudioLDM2Error, ValueError):
    """A request argument is out of range or of the wrong type."""


class ArtifactError(AudioLDM2Error):
    """An artefact folder is missing files, is of another version, or does not match this machine."""


class BackendError(AudioLDM2Error, RuntimeError):
    """A backend could not be created or failed while running a component (names the component)."""


class NonFiniteError(AudioLDM2Error, FloatingPointError):
    """A stage produced NaN or Inf."""


class ExportError(AudioLDM2Error):
    """The export stage was given a bad source or output location."""


class RequestCancelled(AudioLDM2Error):
    """The request was cancelled (its cancel event was set) between two denoising steps."""


class QueueFullError(AudioLDM2Error):
    """A micro-batcher's queue is at its limit; retry later."""
