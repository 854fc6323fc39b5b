"""Data sources and the prepare stage: CIFAR-10 archives, the restricted unpickler, the seeded split."""
