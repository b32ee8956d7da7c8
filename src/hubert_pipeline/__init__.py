"""HuBERT pretraining as a reproducible pipeline: DVC stages, MLflow tracking, local or SLURM execution."""

__version__ = "0.1.0"
