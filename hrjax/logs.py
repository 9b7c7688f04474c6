"""Start-up noise from libraries, filtered record by record so that every other log line (JAX's,
Orbax's warnings, the user's own) keeps the level the user chose.

Dropped: Orbax's and TFDS's INFO/DEBUG chatter (a dozen lines per checkpoint step or dataset
build; both log through absl's logger, which `absl.app.run` sets to INFO), JAX's INFO line about
backends it probed and did not find (`Unable to initialize backend 'tpu'` on every machine without
a TPU), matplotlib's INFO notes about its font cache, and transformers' advice that PyTorch is
absent (hrjax never uses torch). Warnings and errors always pass.
"""

from __future__ import annotations

import logging
import os
import sys

_INSTALLED = "_hrjax_noise_filter"
_QUIET_PACKAGES = ("orbax", "tensorflow_datasets")  # their INFO lines come through absl's logger
_STDLIB_LOGGING, _ABSL_LOGGING = os.path.dirname(logging.__file__), f"absl{os.sep}logging"


def _caller_package() -> str:
    """The top-level package of the code that logged: the first frame outside the logging modules
    (absl's records name absl's own file as their origin, so the stack is read instead)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_STDLIB_LOGGING)
                                 or _ABSL_LOGGING in frame.f_code.co_filename or frame.f_code is _THIS):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "").split(".")[0] if frame is not None else ""


def _drop_library_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or _caller_package() not in _QUIET_PACKAGES


_THIS = _drop_library_info.__code__


def _drop_backend_probe(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.getMessage().startswith("Unable to initialize backend")


def _drop_font_cache_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _drop_torch_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


FILTERS = {  # logger name -> filter
    "absl": _drop_library_info,
    "jax._src.xla_bridge": _drop_backend_probe,
    "matplotlib.font_manager": _drop_font_cache_info,
    "transformers": _drop_torch_advice,
}


def filter_library_noise() -> None:
    """Installs the filters (once; safe to call again)."""
    for name, keep in FILTERS.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, _INSTALLED, False) for f in logger.filters):
            setattr(keep, _INSTALLED, True)
            logger.addFilter(keep)
