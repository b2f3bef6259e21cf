"""Training with compression: a small resumable, sharded, multi-process loop
(`loop`), quantization-aware training (`qat`), knowledge distillation
(`distill`), dynamic sparse training as optax transformations (`sparse`),
low-rank adapters on compressed bases (`adapters`: LoRA, QLoRA, LoftQ, PiSSA)
and learned rounding / clipping against float layers or blocks
(`reconstruct`: AdaRound, OmniQuant's LWC, BRECQ-style blocks).

    from compressjax.train import adapters, loop, qat, reconstruct
"""

from compressjax.train import (adapters, distill, loop, qat, reconstruct,
                               sparse)
from compressjax.train.loop import TrainResult, TrainState, epoch_batches, train

__all__ = ["adapters", "distill", "loop", "qat", "reconstruct", "sparse",
           "train", "TrainState", "TrainResult", "epoch_batches"]
