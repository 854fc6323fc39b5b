"""Training: the loop (``trainer``), handed the parts ``build`` makes from the params; checkpoints and resuming
(``resume``), the guards that stop a run (``guards``), its records (``records``), the early estimate of its length
(``estimate``), and the launchers (``distributed``)."""
