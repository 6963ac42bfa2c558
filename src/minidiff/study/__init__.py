"""The seed study (mini-diffusion-mnist) built from library calls: its reference numbers and
recipes (:mod:`.reference`), the configs of a run (:mod:`.recipes`), the resumable stages
(:mod:`.pipeline`) and the report (:mod:`.report`). Nothing in the library imports this package.

``from minidiff.study import run_study`` works as before; the names are loaded on first use so
that ``minidiff --help`` (which reads :mod:`.reference`) does not import torch.
"""

from .presets import PRESETS, StudyConfig

__all__ = ["PRESETS", "Study", "StudyConfig", "export", "run_study", "summary_lines"]


def __getattr__(name: str):
    if name in ("Study", "export", "run_study", "summary_lines"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
