"""compressjax: compression transforms for JAX/Flax parameter trees.

    import compressjax as cj
    c = cj.quantize(variables, bits=4, group_size=128)      # function form
    t = cj.chain(cj.transforms.sparsify(pattern="nm", n=2, m=4),
                 cj.transforms.quantize(4))                 # object form
    c = t.apply(variables)
    y = jax.jit(lambda c, x: cj.run(model, c, x))(c, x)     # unmodified model
    print(cj.summary(variables, c)); cj.save(path, c)
"""

import inspect
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


def _function_form(build):
  """`name(params, *args, **options)` = `transforms.name(*args,
  **options).apply(params)`, with the builder's signature and docs."""
  def fn(params: Any, *args, **kw) -> Any:
    return build(*args, **kw).apply(params)

  sig = inspect.signature(build)
  first = inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)
  fn.__signature__ = sig.replace(parameters=[first, *sig.parameters.values()],
                                 return_annotation=Any)
  fn.__name__ = fn.__qualname__ = build.__name__
  fn.__doc__ = (f"transforms.{build.__name__}(...).apply(params): the whole "
                f"tree at once.\n\n{build.__doc__}")
  return fn


quantize = _function_form(transforms.quantize)  # round to nearest
sparsify = _function_form(transforms.sparsify)  # magnitude
low_rank = _function_form(transforms.low_rank)  # truncated SVD


__all__ = [
    "CodebookArray", "CompressionError", "calibrate", "formats", "IntFormat", "LowRank", "NMSparseArray", "QArray",
    "Rule", "SparseArray", "Transform", "TreeMismatchError", "apply",
    "bits_per_weight", "chain", "combine", "compression_ratio",
    "is_compressed", "layer_report", "low_rank", "materialize_tree",
    "partition_float", "quantize", "restore", "run", "save", "sparsify",
    "summary", "transforms", "tree_nbytes",
]
