from compressjax.calibrate.capture import (Batch, LayerStats, Stats, capture,
                                           describe)
from compressjax.calibrate.compile_cache import enable_compilation_cache
from compressjax.calibrate.sequential import (block_prefix, execution_order,
                                              one_shot, sequential, stages_of)

__all__ = ["Batch", "LayerStats", "Stats", "block_prefix", "capture",
           "describe", "enable_compilation_cache", "execution_order",
           "one_shot", "sequential", "stages_of"]
