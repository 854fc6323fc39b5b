"""The evaluate and report stages, and the classical baselines (BM3D, non-local means)."""
