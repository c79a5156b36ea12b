"""The DICOM network side of pacsnode and its process: AE, policy, SCP handlers, SCU, CLI."""

from node.config import Settings, load
from node.errors import ConfigError, NodeError, UnknownNodeError

__all__ = ["ConfigError", "NodeError", "Settings", "UnknownNodeError", "load"]
