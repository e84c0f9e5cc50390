"""Config name -> class, for ``strategy.rule.name`` and ``strategy.pre[*].name``."""

from __future__ import annotations

from carefl.robust.bucketing import Bucketing
from carefl.robust.bulyan import Bulyan
from carefl.robust.centered_clip import CenteredClipping
from carefl.robust.clipping import AdaptiveRobustClip, NormClip
from carefl.robust.cosine_filter import CosineFilter
from carefl.robust.geomed import GeometricMedian
from carefl.robust.krum import Krum, MultiKrum
from carefl.robust.mean import WeightedMean
from carefl.robust.median import CoordinateMedian
from carefl.robust.nnm import NearestNeighbourMixing
from carefl.robust.trimmed_mean import TrimmedMean

RULES: dict[str, type] = {
    "mean": WeightedMean,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "geomed": GeometricMedian,
    "centered_clip": CenteredClipping,
    "cosine_filter": CosineFilter,
}

PRE: dict[str, type] = {"clip": NormClip, "arc": AdaptiveRobustClip, "nnm": NearestNeighbourMixing, "bucketing": Bucketing}
