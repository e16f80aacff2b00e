"""Progressive filter pruning inside ``model.fit``."""

from tfcompress.pruning.callback import FilterPruning, load_config, shipped_configs
from tfcompress.pruning.distillation import DistillationAccuracy, DistillationLoss, with_teacher
from tfcompress.pruning.criteria import CRITERIA, geometric_median, importance, l1, l2
from tfcompress.pruning.schedules import SCHEDULES, level_at

__all__ = [
    "CRITERIA", "DistillationAccuracy", "DistillationLoss", "FilterPruning", "SCHEDULES", "geometric_median",
    "importance", "l1", "l2", "level_at", "load_config", "shipped_configs", "with_teacher",
]
