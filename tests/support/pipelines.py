"""Pipelines used by the tests, named in rules as ``tests.support.pipelines:Class``.

They exercise the job machinery (exactly-once, retries, timeouts, crashes)
without image computation: each run appends one line to a log file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pacsnode.analysis.errors import InputError
from pacsnode.analysis.pipelines import Pipeline, PipelineInput, PipelineOutput


class RecordParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    log: str = ""  # file that gets one line per run: "<job id> <pid>"
    seconds: float = 0.0  # work this long before finishing (a duration the test wants, e.g. past a timeout)
    hold_until: str = ""  # a file: the run does not finish before it exists (the test says when it may)
    fail: str = ""  # "input": an AnalysisError (not retried); "crash": a RuntimeError (retried)


class Record(Pipeline):
    name = "record"
    version = "1"
    Params = RecordParams

    def run(self, inputs: PipelineInput, params: BaseModel) -> PipelineOutput:
        assert isinstance(params, RecordParams)
        if params.seconds:
            time.sleep(params.seconds)
        while params.hold_until and not Path(params.hold_until).exists():  # the job's timeout bounds this
            time.sleep(0.05)
        if params.fail == "input":
            raise InputError("the test input cannot be analysed")
        if params.fail == "crash":
            raise RuntimeError("the test pipeline crashed")
        if params.log:
            with Path(params.log).open("a") as fh:
                fh.write(f"{inputs.job_id} {os.getpid()} {inputs.study_instance_uid}\n")
                fh.flush()
                os.fsync(fh.fileno())
        files = sum(len(s.paths) for s in inputs.series)
        return PipelineOutput(datasets=[], summary={"files": files})


class BatchRecord(Record):
    """Record, but the worker hands it several jobs at once: one log line per ``run_many`` call too."""

    name = "batch-record"
    batches_jobs = True

    def run_many(self, inputs, params):  # type: ignore[no-untyped-def]
        assert isinstance(params, RecordParams)
        if params.log:
            with Path(params.log).open("a") as fh:
                fh.write(f"batch {' '.join(str(i.job_id) for i in inputs)}\n")
        return super().run_many(inputs, params)
