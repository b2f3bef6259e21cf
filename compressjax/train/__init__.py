"""Training with compression: a small resumable, sharded loop (`loop`),
quantization-aware training (`qat`), knowledge distillation (`distill`),
low-rank adapters on compressed bases (`adapters`) and
dynamic sparse training as optax transformations (`sparse`).

    from compressjax.train import loop, qat, distill, sparse
"""

from compressjax.train import adapters, distill, loop, qat, sparse
from compressjax.train.loop import TrainResult, TrainState, epoch_batches, train

__all__ = ["adapters", "distill", "loop", "qat", "sparse", "train", "TrainState",
           "TrainResult", "epoch_batches"]
