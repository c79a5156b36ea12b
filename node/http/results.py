"""Result objects as the dashboard shows them: SR measurements as rows, a SEG drawn over its source slice.

The source slice is rendered by the WADO-RS code (:func:`pacsnode.node.http.wado.render`,
the same pixels ``/rendered`` serves); the segments are read with highdicom and
blended on top with OpenCV.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

__all__ = ["Measurement", "measurements", "seg_overlay", "seg_sources", "SegmentLegend"]

logger = logging.getLogger(__name__)

# Segment colours in the overlay (RGB), by segment order; the legend repeats them.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 80, 60),
    (60, 140, 230),
    (80, 200, 120),
    (240, 190, 40),
    (180, 90, 220),
    (40, 200, 200),
)
_MAX_ROWS = 500
_MAX_SIDE = 512
_MIN_SIDE = 384


@dataclass(frozen=True)
class Measurement:
    """One NUM content item of an SR, with the group it belongs to."""

    group: str
    name: str
    value: str
    unit: str


def _code_meaning(item: Dataset, keyword: str) -> str:
    seq = item.get(keyword)
    if not seq:
        return ""
    return str(seq[0].get("CodeMeaning", "") or seq[0].get("CodeValue", ""))


def _group_name(container: Dataset, inherited: str) -> str:
    """A measurement group's label: its Tracking Identifier, else its finding site, else the container's name."""
    tracking = ""
    site = ""
    for item in container.get("ContentSequence", []):
        name = _code_meaning(item, "ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and name == "Tracking Identifier":
            tracking = str(item.get("TextValue", ""))
        elif item.get("ValueType") == "CODE" and name == "Finding Site":
            site = _code_meaning(item, "ConceptCodeSequence")
    return tracking or site or inherited


def measurements(path: Path) -> list[Measurement]:
    """Every numeric measurement of an SR file, in document order (at most 500)."""
    ds = dcmread(path)
    rows: list[Measurement] = []

    def walk(items: Any, group: str) -> None:
        for item in items:
            if len(rows) >= _MAX_ROWS:
                return
            value_type = item.get("ValueType")
            if value_type == "NUM" and "MeasuredValueSequence" in item and item.MeasuredValueSequence:
                measured = item.MeasuredValueSequence[0]
                unit = _code_meaning(measured, "MeasurementUnitsCodeSequence")
                rows.append(
                    Measurement(
                        group=group,
                        name=_code_meaning(item, "ConceptNameCodeSequence"),
                        value=_number(measured.get("NumericValue")),
                        unit="" if unit in ("no units", "1") else unit,
                    )
                )
            if "ContentSequence" in item:
                inner = _group_name(item, group) if value_type == "CONTAINER" else group
                walk(item.ContentSequence, inner)

    walk(ds.get("ContentSequence", []), "")
    return rows


def _number(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value or "")
    return f"{number:.4g}" if abs(number) < 1e4 else f"{number:.0f}"


@dataclass(frozen=True)
class SegmentLegend:
    number: int
    label: str
    colour: str  # CSS hex


def seg_sources(path: Path) -> tuple[list[str], list[SegmentLegend]]:
    """The source SOP Instance UIDs a SEG's frames were derived from, and its segments with their colours."""
    seg = hd.seg.segread(path, lazy_frame_retrieval=True)
    sources = [str(sop) for _study, _series, sop in seg.get_source_image_uids()]
    legend = [
        SegmentLegend(number=int(desc.segment_number), label=str(desc.segment_label), colour=_hex(PALETTE[i % 6]))
        for i, desc in enumerate(seg.SegmentSequence)
    ]
    return sources, legend


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def seg_overlay(seg_path: Path, source_path: Path, source_uid: str, render: Callable[..., bytes]) -> bytes:
    """A PNG of ``source_path`` (rendered by ``render``, the WADO-RS renderer) with the SEG's segments
    on that slice filled and outlined in :data:`PALETTE` colours."""
    seg = hd.seg.segread(seg_path, lazy_frame_retrieval=True)
    numbers = [int(desc.segment_number) for desc in seg.SegmentSequence]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source_uid],
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        dtype=np.uint8,
    )[0]  # rows, columns, segments
    source = dcmread(source_path, stop_before_pixels=True)
    window = "-600,1500" if str(source.get("Modality", "")) == "CT" else None  # the lungs, on a CT
    encoded = render(source_path, media_type="image/png", window=window)
    grey = cv2.imdecode(np.frombuffer(encoded, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError("the source slice could not be rendered")
    height, width = grey.shape[:2]
    scale = min(_MAX_SIDE, max(_MIN_SIDE, height, width)) / max(height, width)
    if scale != 1:  # small slices drawn larger, so the outlines stay thin; large ones at most _MAX_SIDE
        height, width = round(height * scale), round(width * scale)
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    for index in range(masks.shape[-1]):
        mask = masks[..., index]
        if mask.shape != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        on = mask > 0
        if not on.any():
            continue
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        blended = rgb[on].astype(np.float32) * 0.6 + colour * 0.4
        rgb[on] = blended.astype(np.uint8)
        contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(rgb, contours, -1, tuple(int(c) for c in PALETTE[index % len(PALETTE)]), 1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("the overlay could not be encoded")
    return bytes(png.tobytes())
