from compressjax.calibrate.capture import LayerStats, capture
from compressjax.calibrate.sequential import (block_prefix, execution_order,
                                              one_shot, sequential, stages_of)

__all__ = ["LayerStats", "block_prefix", "capture", "execution_order",
           "one_shot", "sequential", "stages_of"]
