"""Training-loop integrations: Hugging Face ``Trainer`` (:mod:`mtlopt.integrations.hf`),
Lightning (:mod:`mtlopt.integrations.lightning`) and Accelerate (:mod:`mtlopt.integrations.accelerate`).

Each module imports its framework on import only; ``import mtlopt`` never needs them.
"""
