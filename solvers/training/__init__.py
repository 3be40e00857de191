"""The fine-tuning solver and what it delegates to: checkpoints, resume, preemption, memory planning, SLURM, curves."""
