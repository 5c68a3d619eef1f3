"""Exceptions for errors a user can act on (bad files, bad checkpoints, bad settings, bad client data).

Library code raises these with a message that says what was wrong and what to do; entry points (CLI, server)
catch `OpenMoshiError` and show the message without a traceback.
"""

from __future__ import annotations


class OpenMoshiError(Exception):
    """Base class of every user-facing openmoshi error."""


class AudioError(OpenMoshiError):
    """An audio file or buffer is missing, unreadable, empty or has an unusable shape."""


class CheckpointError(OpenMoshiError):
    """A checkpoint is missing, truncated, or does not match the expected model."""


class ConfigError(OpenMoshiError):
    """A configuration value or argument is invalid or inconsistent."""


class ProtocolError(OpenMoshiError):
    """A client sent data that breaks the streaming protocol (bad message, corrupt Ogg-Opus stream)."""
