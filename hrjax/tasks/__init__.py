"""Routing tasks: datasets, answer scorers and the code-execution sandbox."""
