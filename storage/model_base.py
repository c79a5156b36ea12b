"""The pydantic base of pacsnode's settings, manifests and parameters.

It lives in storage, the one package that both node and analysis may import,
so the node's config, the storage and analysis settings, model manifests,
preprocessing steps and pipeline parameters all share one definition.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not be ignored) and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
