"""A training process of a two-process run, started by test_training.py with torch.multiprocessing.

Rank 1 is made unable to write any file through the run directory's only writer (``atomic_write``), so
the run completing proves that rank 0 alone writes.
"""

import os


def train_as_rank(rank: int, world_size: int, port: int, config_values: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from mixnet import fileio
    from mixnet.training.config import TrainConfig
    from mixnet.training.loop import train

    if rank != 0:
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} tried to write a file")

        fileio.tempfile.mkstemp = refuse  # every atomic_write starts here
    train(TrainConfig.from_dict(config_values))
