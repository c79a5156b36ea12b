"""Typed settings owned by the analysis package: workers, job policy, routing rules."""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from pacsnode.storage.model_base import StrictModel

__all__ = ["AnalysisSettings", "EngineOptions", "Rule", "RuleMatch", "ReadyWhen"]

Seconds = Annotated[float, Field(gt=0)]


def _none_is_any(value: object) -> object:
    return [] if value is None else value


AnyOf = Annotated[list[str], BeforeValidator(_none_is_any)]
"""A list of accepted values; an empty list or null (YAML ``~``) means any value."""


@cache
def _sop_class_uids() -> dict[str, str]:
    """SOP class keywords (``CTImageStorage``) and their UIDs, from pydicom's UID dictionary."""
    from pydicom._uid_dict import UID_dictionary  # what pydicom.uid imports (and does not re-export)

    known = {
        keyword: uid
        for uid, (_name, kind, _info, _retired, keyword) in UID_dictionary.items()
        if keyword and kind.endswith("SOP Class")
    }
    return {**_NEWER_SOP_CLASSES, **known}


# Storage SOP classes of DICOM 2024 that pydicom 3.0's UID dictionary does not list yet.
_NEWER_SOP_CLASSES = {
    "LabelMapSegmentationStorage": "1.2.840.10008.5.1.4.1.1.66.7",
    "HeightMapSegmentationStorage": "1.2.840.10008.5.1.4.1.1.66.8",
    "WaveformPresentationStateStorage": "1.2.840.10008.5.1.4.1.1.9.100.1",
    "WaveformAcquisitionPresentationStateStorage": "1.2.840.10008.5.1.4.1.1.9.100.2",
}


class RuleMatch(StrictModel):
    """Conditions on a series; all given ones must hold (an empty list or null = any)."""

    modality: AnyOf = []
    body_part: AnyOf = []  # BodyPartExamined, case-insensitive
    sop_class: AnyOf = []  # UIDs or keywords such as CTImageStorage
    series_description: str | None = None  # regular expression, searched case-insensitively
    study_description: str | None = None  # regular expression, searched case-insensitively
    protocol_name: str | None = None  # regular expression, searched case-insensitively
    calling_ae: AnyOf = []  # the AE title that sent the series
    min_instances: Annotated[int, Field(ge=1)] = 1
    max_instances: Annotated[int, Field(ge=1)] | None = None
    min_rows: Annotated[int, Field(ge=1)] | None = None
    min_columns: Annotated[int, Field(ge=1)] | None = None
    max_rows: Annotated[int, Field(ge=1)] | None = None
    max_columns: Annotated[int, Field(ge=1)] | None = None
    # What the images show, decided by the worker on the decoded volume (not from the header):
    # chest = the lung segmentation finds lungs (pacsnode.analysis.lung.anatomy). A series that
    # does not show it ends its job "skipped", with no results and no failure.
    anatomy: Literal["chest"] | None = None

    @field_validator("series_description", "study_description", "protocol_name")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("sop_class")
    @classmethod
    def _sop_classes(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            if value and value[0].isdigit():
                out.append(value)
                continue
            uid = _sop_class_uids().get(value)
            if uid is None:
                raise ValueError(f"unknown SOP class {value!r}: give a UID or a keyword such as CTImageStorage")
            out.append(uid)
        return out

    @property
    def needs_image_size(self) -> bool:
        return any(v is not None for v in (self.min_rows, self.min_columns, self.max_rows, self.max_columns))


class ReadyWhen(StrictModel):
    """Start before the quiet time is over when these hold (optional)."""

    instances: Annotated[int, Field(ge=1)] | None = None  # the series (or study) has this many instances
    series: list[str] = []  # study scope: a series whose description matches each regex is present

    @field_validator("series")
    @classmethod
    def _regexes(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
        return values


class EngineOptions(StrictModel):
    """How a model runs (:mod:`pacsnode.analysis.cnn.engine`); the ``engine`` key of a model pipeline's params."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: on CUDA the largest batch (up to 256) that fits the memory budget; on the CPU the fastest of
    # 1..16 that fits, timed once per slice shape. A number: that many, unless the budget allows fewer.
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    memory_budget_mb: Annotated[float, Field(gt=0)] = 4096.0
    prefetch_batches: Annotated[int, Field(ge=1, le=16)] = 2


class Rule(StrictModel):
    """Which received series a pipeline analyses, with what parameters, and where its results go."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    pipeline: Annotated[str, Field(min_length=1, max_length=200)]
    enabled: bool = True
    scope: Literal["series", "study"] = "series"
    match: RuleMatch = RuleMatch()
    ready_when: ReadyWhen = ReadyWhen()
    quiet_seconds: Seconds | None = None  # default: analysis.quiet_seconds
    reanalyze: bool = True  # instances arriving after the analysis start it again (results replaced)
    params: dict[str, Any] = {}
    destinations: list[str] = []  # names in remote_nodes
    timeout_seconds: Seconds | None = None  # default: analysis.job_timeout_seconds

    @model_validator(mode="after")
    def _pipeline(self) -> Rule:
        from pacsnode.analysis.errors import PipelineError
        from pacsnode.analysis.pipelines import resolve_pipeline

        try:
            pipeline = resolve_pipeline(self.pipeline)
        except PipelineError as exc:
            raise ValueError(str(exc)) from exc
        try:
            pipeline.Params.model_validate(self.params)
        except Exception as exc:
            raise ValueError(f"params of pipeline {self.pipeline!r}: {exc}") from exc
        return self


class AnalysisSettings(StrictModel):
    """Workers, job policy and routing rules."""

    workers: Annotated[int, Field(ge=0, le=64)] = 1
    batch_jobs: Annotated[int, Field(ge=1, le=64)] = 4  # pending jobs of one rule run together (CNN pipelines)
    quiet_seconds: Seconds = 60.0
    scan_interval_seconds: Seconds = 2.0
    job_timeout_seconds: Seconds = 1800.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_backoff_seconds: Seconds = 30.0
    retry_backoff_max_seconds: Seconds = 900.0
    lease_seconds: Annotated[float, Field(ge=1)] = 30.0
    uid_root: str = "2.25"
    rules: list[Rule] = []

    @field_validator("uid_root")
    @classmethod
    def _root(cls, value: str) -> str:
        value = value.rstrip(".")
        if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", value) or len(value) > 40:
            raise ValueError(f"{value!r} is not a UID root (digits and dots, at most 40 characters)")
        return value

    @model_validator(mode="after")
    def _unique(self) -> AnalysisSettings:
        names = [rule.name for rule in self.rules]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"rule name {name!r} is used more than once")
        return self
