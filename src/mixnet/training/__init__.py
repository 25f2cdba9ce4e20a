"""Training and fine-tuning: configuration and recipes, optimisers and schedules, sampling, distributed
set-up, the run directory's files, and the loop."""
