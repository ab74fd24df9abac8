"""Errors a user can cause and fix. The CLI prints them as one line, without a traceback."""


class PipelineError(Exception):
    """A problem with the user's data, params or paths; the message says what to fix."""
