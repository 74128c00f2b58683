"""Data: the synthetic cohort, NIfTI validation, datasets and federated partitions."""
