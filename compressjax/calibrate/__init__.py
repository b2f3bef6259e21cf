from compressjax.calibrate.capture import LayerStats, capture

__all__ = ["LayerStats", "capture"]
