"""A module that takes `IMPORT_SECONDS` to import, as JAX takes seconds: a child process reading a payload that
names it imports it half-way through reading (`tests/test_local_processes.py`)."""

import time

IMPORT_SECONDS = 2.0
time.sleep(IMPORT_SECONDS)


class Named:
    """An object whose unpickling imports this module."""
