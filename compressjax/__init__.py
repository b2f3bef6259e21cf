"""compressjax: compression transforms for JAX/Flax parameter trees.

    import compressjax as cj
    c = cj.quantize(variables, bits=4, group_size=128)      # function form
    t = cj.chain(cj.transforms.sparsify(pattern="nm", n=2, m=4),
                 cj.transforms.quantize(4))                 # object form
    c = t.apply(variables)
    y = jax.jit(lambda c, x: cj.run(model, c, x))(c, x)     # unmodified model
    print(cj.summary(variables, c)); cj.save(path, c)
"""

from typing import Any

from compressjax import calibrate, formats, transforms
from compressjax.core import (CodebookArray, CompressionError, LowRank,
                              NMSparseArray, QArray,
                              Rule, SparseArray, TreeMismatchError, combine,
                              is_compressed, materialize_tree, partition_float)
from compressjax.core.checkpoint import restore, save
from compressjax.core.report import (bits_per_weight, compression_ratio,
                                     layer_report, summary, tree_nbytes)
from compressjax.formats import IntFormat
from compressjax.runtime.interpret import apply, run
from compressjax.core.transform import Transform, chain

__version__ = "0.1.0"


def quantize(params: Any, bits: int | None = None, **kw) -> Any:
  """Round-to-nearest quantization of a whole tree (see transforms.quantize)."""
  return transforms.quantize(bits, **kw).apply(params)


def sparsify(params: Any, sparsity: float = 0.5, **kw) -> Any:
  """Magnitude sparsification of a whole tree (see transforms.sparsify)."""
  return transforms.sparsify(sparsity, **kw).apply(params)


def low_rank(params: Any, rank: int | None = None, **kw) -> Any:
  """Truncated-SVD factorization of a whole tree (see transforms.low_rank)."""
  return transforms.low_rank(rank, **kw).apply(params)


__all__ = [
    "CodebookArray", "CompressionError", "calibrate", "formats", "IntFormat", "LowRank", "NMSparseArray", "QArray",
    "Rule", "SparseArray", "Transform", "TreeMismatchError", "apply",
    "bits_per_weight", "chain", "combine", "compression_ratio",
    "is_compressed", "layer_report", "low_rank", "materialize_tree",
    "partition_float", "quantize", "restore", "run", "save", "sparsify",
    "summary", "transforms", "tree_nbytes",
]
