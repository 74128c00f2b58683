"""Membership inference on brain-age regression models (spec: privacy.md).

One concept per module:

metrics
    Scores and labels -> ROC, AUC, balanced accuracy, advantage, TPR at low FPR, bootstrap CIs,
    and the tidy results table (target, sparsity, environment, threat_model, attack, metric,
    value, ci_low, ci_high).
gradients
    Per-sample gradients of the squared error (``torch.func.vmap``) and white-box features.
attacks
    Loss threshold, black-box and white-box classifiers; the attacker's train / test split.
lira
    LiRA for regression: shadow membership, shadow statistics (via the caller's ``train_fn``),
    online and offline scores.
threat
    Federated threat models: outsider, honest-but-curious server per round, averaged over rounds.

Scores are always "higher = more likely a member"; labels are 1 for members, 0 for non-members.
"""

from fedsparse_lib.privacy.attacks import (
    ATTACK_CLASSIFIERS,
    ATTACKS,
    AttackerSplit,
    attack_scores,
    attacker_split,
    black_box_features,
    classifier_scores,
    loss_threshold_scores,
    make_attack_classifier,
)
from fedsparse_lib.privacy.gradients import (
    gradient_features,
    last_layer_names,
    per_sample_gradients,
    white_box_features,
)
from fedsparse_lib.privacy.lira import (
    lira_offline_scores,
    lira_online_scores,
    residual_statistic,
    shadow_membership,
    shadow_statistics,
)
from fedsparse_lib.privacy.metrics import (
    RESULT_COLUMNS,
    attack_metrics,
    attack_results,
    balanced_accuracy,
    bootstrap_metrics,
    membership_advantage,
    results_table,
    roc_auc,
    roc_points,
    tpr_at_fpr,
)
from fedsparse_lib.privacy.threat import (
    OUTSIDER,
    SERVER_ROUNDS_MEAN,
    average_round_scores,
    load_state,
    outsider_scores,
    server_round_scores,
    server_threat_model,
    threat_results,
)

__all__ = [
    "ATTACKS",
    "ATTACK_CLASSIFIERS",
    "OUTSIDER",
    "RESULT_COLUMNS",
    "SERVER_ROUNDS_MEAN",
    "AttackerSplit",
    "attack_metrics",
    "attack_results",
    "attack_scores",
    "attacker_split",
    "average_round_scores",
    "balanced_accuracy",
    "black_box_features",
    "bootstrap_metrics",
    "classifier_scores",
    "gradient_features",
    "last_layer_names",
    "lira_offline_scores",
    "lira_online_scores",
    "load_state",
    "loss_threshold_scores",
    "make_attack_classifier",
    "membership_advantage",
    "outsider_scores",
    "per_sample_gradients",
    "residual_statistic",
    "results_table",
    "roc_auc",
    "roc_points",
    "server_round_scores",
    "server_threat_model",
    "shadow_membership",
    "shadow_statistics",
    "threat_results",
    "tpr_at_fpr",
    "white_box_features",
]
