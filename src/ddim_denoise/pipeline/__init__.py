"""What every stage shares: the params schema, stage file names, checkpoints, errors, runtime policy, MLflow tracking, code identity."""
