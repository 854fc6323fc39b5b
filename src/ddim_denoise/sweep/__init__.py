"""The Optuna search: space, objective, storage, MLflow records and its report."""
