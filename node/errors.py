"""Exceptions raised by the node package."""

from __future__ import annotations

__all__ = ["NodeError", "ConfigError", "UnknownNodeError"]


class NodeError(Exception):
    """Base class of every error raised by :mod:`node`."""


class ConfigError(NodeError):
    """The configuration file cannot be used; the message names the file and key."""


class UnknownNodeError(NodeError):
    """A remote node name is neither configured nor written as ``AET@HOST:PORT``."""
