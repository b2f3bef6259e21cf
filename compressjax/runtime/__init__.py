from compressjax.runtime.interpret import apply, run

__all__ = ["apply", "run"]
