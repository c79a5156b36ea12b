"""Pipelines: what a job runs, and how a name in a rule finds one.

A pipeline is a class with a ``name``, a ``version``, a pydantic ``Params``
model (the rule's ``params`` are validated against it when the config loads)
and ``run(inputs, params) -> PipelineOutput``. Built-in pipelines are named
(``ct-lung``); a site's own is named by import path, ``package.module:Class``.
Heavy imports (scipy, highdicom, torch) happen inside ``run``, so loading the
config stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from pydicom.dataset import Dataset

from pacsnode.analysis.errors import PipelineError
from pacsnode.storage.model_base import StrictModel

__all__ = [
    "BUILTIN_PIPELINES",
    "Pipeline",
    "PipelineError",
    "PipelineInput",
    "PipelineOutput",
    "SeriesInput",
    "resolve_pipeline",
]

BUILTIN_PIPELINES: dict[str, str] = {
    "ct-lung": "pacsnode.analysis.lung.pipeline:CtLungPipeline",
    "ct-lung-nodule": "pacsnode.analysis.cnn.pipeline:LungNodulePipeline",
    "model": "pacsnode.analysis.cnn.pipeline:ModelPipeline",
}


class NoParams(StrictModel):
    """The params of a pipeline that takes none: an empty mapping."""


@dataclass(frozen=True, kw_only=True)
class SeriesInput:
    series_instance_uid: str
    modality: str | None
    series_description: str | None
    paths: tuple[Path, ...]


@dataclass(frozen=True, kw_only=True)
class PipelineInput:
    """What a job hands its pipeline: the study, the series the rule selected, where UIDs come from."""

    job_id: int
    study_instance_uid: str
    series: tuple[SeriesInput, ...]
    uid_root: str
    # time.monotonic() value by which the job must finish; a pipeline may stop cleanly when it passes
    deadline: float | None = None
    # The rule's match.anatomy: the pipeline checks the decoded volume shows it before writing results
    # (pacsnode.analysis.lung.anatomy.check_anatomy) and raises AnatomyMismatch when it does not.
    anatomy: str | None = None


@dataclass(frozen=True, kw_only=True)
class PipelineOutput:
    """Result objects to store and export, and a JSON-able summary kept on the job."""

    datasets: list[Dataset]
    summary: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Base class of pipelines."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    #: True when ``run_many`` is worth more than ``run`` in a loop (the worker then claims jobs in batches).
    batches_jobs: ClassVar[bool] = False

    def run(self, inputs: PipelineInput, params: BaseModel) -> PipelineOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_many(self, inputs: Sequence[PipelineInput], params: BaseModel) -> list[PipelineOutput | Exception]:
        """Several jobs' inputs; per job its output or the error it met. Default: ``run`` for each."""
        out: list[PipelineOutput | Exception] = []
        for item in inputs:
            try:
                out.append(self.run(item, params))
            except Exception as exc:  # noqa: BLE001 - one job's error is its own outcome
                out.append(exc)
        return out

    def check(self, params: BaseModel) -> None:
        """Deeper checks for ``pacsnode check-config`` (e.g. build a model once); raise AnalysisError."""


def resolve_pipeline(name: str) -> type[Pipeline]:
    """The pipeline class for a rule's ``pipeline`` value.

    Raises
    ------
    PipelineError
        Unknown built-in name, module or class not importable, or not a Pipeline.
    """
    target = BUILTIN_PIPELINES.get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(BUILTIN_PIPELINES))
        raise PipelineError(f"unknown pipeline {name!r}: built-in pipelines are {known}, or give module:Class")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PipelineError(f"pipeline {name!r}: cannot import module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise PipelineError(f"pipeline {name!r}: {target} is not a pacsnode Pipeline class")
    if not cls.name or not cls.version:
        raise PipelineError(f"pipeline {name!r}: {target} has no name or version")
    return cls
