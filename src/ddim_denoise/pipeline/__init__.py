"""What every stage shares: the params schema and profiles, stage file names, checkpoints, errors, runtime policy,
MLflow tracking, code identity."""
