"""The errors the analysis package raises.

Every one but :class:`InferenceTimeout` derives from :class:`AnalysisError`:
the input or the setup cannot be analysed, so the worker fails the job without
a retry and keeps the message as its error text. :class:`SkipAnalysis` (and
:class:`AnatomyMismatch`) is the exception to that: the images are fine but not
what the rule asks for, so the worker records the job ``skipped`` with the
message as its reason, not failed. :class:`InferenceTimeout` is a
:class:`TimeoutError` instead, so the job is retried.
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "AnatomyMismatch",
    "InferenceTimeout",
    "InputError",
    "ModelError",
    "PipelineError",
    "SkipAnalysis",
]


class AnalysisError(Exception):
    """Base of every error raised by :mod:`pacsnode.analysis`; the message is the job's error text."""


class InputError(AnalysisError):
    """The input series cannot be analysed (too few slices, mixed geometry, undecodable pixels)."""


class PipelineError(AnalysisError):
    """A pipeline name that does not resolve, or a class that is not a pipeline."""


class ModelError(AnalysisError):
    """A model package that cannot be used: missing file, wrong checksum, bad or incompatible spec."""


class SkipAnalysis(AnalysisError):
    """The series is not for this rule after all: the job ends ``skipped`` (no results, not a failure).

    An :class:`AnalysisError`, so that code that does not know it still ends the job without a retry.
    """


class AnatomyMismatch(SkipAnalysis):
    """The decoded images do not show the anatomy the rule asks for (``match.anatomy``)."""


class InferenceTimeout(TimeoutError):
    """Inference went past the job's deadline (a transient failure: the job is retried)."""
