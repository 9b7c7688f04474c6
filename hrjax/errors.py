"""User-facing error types: each message names the problem and the fix."""


class HrjaxError(Exception):
    """Base class of every error hrjax raises on bad input."""


class UnsupportedArchitectureError(HrjaxError, ValueError):
    """A checkpoint declares an architecture that has no Flax port."""


class CheckpointError(HrjaxError, ValueError):
    """A checkpoint is missing, truncated or inconsistent with its config."""


class PromptTooLongError(HrjaxError, ValueError):
    """A prompt plus its generation budget exceeds the model's context."""


class OfflineError(HrjaxError, RuntimeError):
    """A hub download was needed but the network is unreachable."""


class TrainingDivergedError(HrjaxError, FloatingPointError):
    """A loss or parameter became NaN or infinite; training stopped without saving that state."""
