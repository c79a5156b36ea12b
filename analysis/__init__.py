"""Preprocessing, models, inference and result writers.

Not built yet: the analysis path (stable study -> job -> pipeline -> SEG/SR/SC)
is the next stage of pacsnode. This package exists so the layout is in place;
nothing imports it at run time today.
"""

__all__: list[str] = []
