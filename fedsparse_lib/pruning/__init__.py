"""Pruning: masks as data, schedules and importance scores.

One concept per module (after jaxpruner):

schedules
    *When* to prune and to which cumulative sparsity: cubic (FedSparsify), NNZ-percentage,
    one-shot, constant.
scores
    *Which* weights matter: magnitude, random, SNIP, GraSP, SynFlow.
masks
    *Scores -> mask* (global or layer-wise, exact counts, masks that only shrink), applying masks
    to weights and gradients, per-tensor sparsity summaries and layer-collapse detection.

Masks are ``dict[str, torch.BoolTensor]`` keyed by the model's state_dict names, kept beside the
weights and never inside the module.
"""

from fedsparse_lib.pruning.masks import (
    apply_mask,
    emptied_layers,
    global_magnitude_mask,
    global_mask,
    layerwise_magnitude_mask,
    layerwise_mask,
    mask_gradients,
    mask_sparsity,
    ones_mask,
    prunable_names,
    sparsity_summary,
)
from fedsparse_lib.pruning.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CubicSchedule,
    NNZSchedule,
    OneShotSchedule,
    Schedule,
    make_schedule,
    schedule_table,
)
from fedsparse_lib.pruning.scores import (
    grasp_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
    synflow_mask,
    synflow_scores,
)

__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CubicSchedule",
    "NNZSchedule",
    "OneShotSchedule",
    "Schedule",
    "apply_mask",
    "emptied_layers",
    "global_magnitude_mask",
    "global_mask",
    "grasp_scores",
    "layerwise_magnitude_mask",
    "layerwise_mask",
    "magnitude_scores",
    "make_schedule",
    "mask_gradients",
    "mask_sparsity",
    "ones_mask",
    "prunable_names",
    "random_scores",
    "schedule_table",
    "snip_scores",
    "sparsity_summary",
    "synflow_mask",
    "synflow_scores",
]
