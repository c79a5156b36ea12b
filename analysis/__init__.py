"""Analysis: routing rules, pipelines, volumes, segmentation and result writers.

No pynetdicom and no index access here: a pipeline gets file paths and
returns datasets (:class:`pacsnode.analysis.pipelines.PipelineOutput`); the node's
workers store and export them. Heavy modules (scipy, highdicom) are imported
by the pipelines when they run, not by this package.
"""

from pacsnode.analysis.errors import AnalysisError, InputError, PipelineError
from pacsnode.analysis.pipelines import (
    BUILTIN_PIPELINES,
    Pipeline,
    PipelineInput,
    PipelineOutput,
    SeriesInput,
    resolve_pipeline,
)
from pacsnode.analysis.settings import AnalysisSettings, ReadyWhen, Rule, RuleMatch
from pacsnode.analysis.types import LungResult, Volume

__all__ = [
    "AnalysisError",
    "AnalysisSettings",
    "BUILTIN_PIPELINES",
    "InputError",
    "LungResult",
    "Pipeline",
    "PipelineError",
    "PipelineInput",
    "PipelineOutput",
    "ReadyWhen",
    "Rule",
    "RuleMatch",
    "SeriesInput",
    "Volume",
    "resolve_pipeline",
]
