"""What a CT volume shows, for rules with ``match.anatomy``: decided on the decoded images.

Real archives often leave BodyPartExamined empty or wrong, so a rule can ask
for ``anatomy: chest`` instead: the pipeline decodes the series, and before it
writes any result, :func:`check_anatomy` runs the lung segmentation
(:func:`pacsnode.analysis.lung.segmentation.segment_lungs`) on the volume. When
it finds less than :data:`CHEST_MIN_LUNG_ML` of lung, the pipeline raises
:class:`~pacsnode.analysis.errors.AnatomyMismatch` and the worker records the job
``skipped`` with the reason (no results, no export, not a failure).

Every pipeline that honours ``anatomy`` calls :func:`check_anatomy` once per job
on the volume it analyses; the ``ct-lung`` pipeline reuses the segmentation it
returns instead of segmenting twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pacsnode.analysis.errors import AnatomyMismatch, InputError

if TYPE_CHECKING:  # pragma: no cover
    from pacsnode.analysis.types import LungResult, Volume

__all__ = ["ANATOMIES", "CHEST_MIN_LUNG_ML", "NO_LUNGS", "check_anatomy"]

#: The values ``match.anatomy`` may take.
ANATOMIES = ("chest",)

#: Least lung volume (both lungs, mL) for a volume to count as a chest. Adult lungs hold 4-6 L at
#: full inspiration and still 2-3 L at full expiration, so a chest CT that covers them shows
#: well over 1 L even with disease; the lung bases at the top of an abdomen CT are a few hundred
#: mL, and a head, neck or limb CT has none. A small child's whole chest can hold less than
#: this: such studies are skipped by an ``anatomy: chest`` rule.
CHEST_MIN_LUNG_ML = 1000.0

#: The start of the reason a job is skipped with when a chest rule's images show no lungs.
NO_LUNGS = "no lungs in the images"


def check_anatomy(volume: Volume, anatomy: str | None, *, air_threshold_hu: int = -400) -> LungResult | None:
    """Check that ``volume`` shows ``anatomy`` (a rule's ``match.anatomy``); None asks for nothing.

    Parameters
    ----------
    volume
        The decoded CT volume in HU, as the pipeline will analyse it.
    anatomy
        ``"chest"``, or None (no check, nothing computed).
    air_threshold_hu
        Passed to the lung segmentation (the ``ct-lung`` pipeline passes its own parameter, so the
        segmentation returned is the one it would have made).

    Returns
    -------
    LungResult or None
        For ``chest``: the lung segmentation that found the lungs (reuse it rather than segmenting
        again); None when ``anatomy`` is None.

    Raises
    ------
    AnatomyMismatch
        The images do not show the anatomy; the message (the job's skip reason) starts with
        :data:`NO_LUNGS` and says what the segmentation found.
    ValueError
        An ``anatomy`` pacsnode does not know.
    """
    if anatomy is None:
        return None
    if anatomy != "chest":
        raise ValueError(f"unknown anatomy {anatomy!r}: pacsnode knows {', '.join(ANATOMIES)}")
    from pacsnode.analysis.lung.segmentation import segment_lungs

    try:
        lungs = segment_lungs(volume, air_threshold_hu=air_threshold_hu)
    except InputError as exc:  # no air region large enough inside the body to be a lung
        raise AnatomyMismatch(f"{NO_LUNGS} (the rule asks for anatomy: chest): {exc}") from exc
    if lungs.total_volume_ml < CHEST_MIN_LUNG_ML:
        raise AnatomyMismatch(
            f"{NO_LUNGS} (the rule asks for anatomy: chest): {lungs.total_volume_ml:.0f} mL of lung found, "
            f"less than the {CHEST_MIN_LUNG_ML:.0f} mL of a chest"
        )
    return lungs
