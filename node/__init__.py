"""The DICOM network side of pacsnode and its process: AE, policy, SCP handlers, SCU, CLI."""

from pacsnode.node.config import Settings, load
from pacsnode.node.errors import ConfigError, NodeError, UnknownNodeError

__all__ = ["ConfigError", "NodeError", "Settings", "UnknownNodeError", "load"]
