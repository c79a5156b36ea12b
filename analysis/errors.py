"""The errors the analysis package raises.

Every one but :class:`InferenceTimeout` derives from :class:`AnalysisError`:
the input or the setup cannot be analysed, so the worker fails the job without
a retry and keeps the message as its error text. :class:`InferenceTimeout` is a
:class:`TimeoutError` instead, so the job is retried.
"""

from __future__ import annotations

__all__ = ["AnalysisError", "InferenceTimeout", "InputError", "ModelError", "PipelineError"]


class AnalysisError(Exception):
    """Base of every error raised by :mod:`pacsnode.analysis`; the message is the job's error text."""


class InputError(AnalysisError):
    """The input series cannot be analysed (too few slices, mixed geometry, undecodable pixels)."""


class PipelineError(AnalysisError):
    """A pipeline name that does not resolve, or a class that is not a pipeline."""


class ModelError(AnalysisError):
    """A model package that cannot be used: missing file, wrong checksum, bad or incompatible spec."""


class InferenceTimeout(TimeoutError):
    """Inference went past the job's deadline (a transient failure: the job is retried)."""
