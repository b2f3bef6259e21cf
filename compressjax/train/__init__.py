"""Training with compression: a small resumable, sharded loop (`loop`),
quantization-aware training (`qat`), knowledge distillation (`distill`) and
dynamic sparse training as optax transformations (`sparse`).

    from compressjax.train import loop, qat, distill, sparse
"""

from compressjax.train import distill, loop, qat, sparse
from compressjax.train.loop import TrainResult, TrainState, epoch_batches, train

__all__ = ["distill", "loop", "qat", "sparse", "train", "TrainState",
           "TrainResult", "epoch_batches"]
