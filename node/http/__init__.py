"""The node's HTTP face: DICOMweb (PS3.18) at ``/dicom-web``, the dashboard, metrics and health.

``build_app`` (in :mod:`pacsnode.node.http.app`) imports Starlette; this package's
``__init__`` and :mod:`~pacsnode.node.http.settings` do not, so loading the config stays light.
"""

from __future__ import annotations

__all__: list[str] = []
