"""orbax checkpoints of compressed trees, exact in types, dtypes and values.

The arrays (codes, scales, packed masks, ... never a float copy) are saved with
orbax's StandardCheckpointHandler; the tree's structure, including each
compressed leaf's class and static metadata, is saved as JSON beside them in
the same orbax checkpoint, so `restore(path)` rebuilds the tree with no
template. Trees may hold dicts, lists, tuples, None, arrays, Python scalars and
compressed leaves (for an NNX State, save `state.to_pure_dict()` and restore
with `nnx.replace_by_pure_dict`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from compressjax.core.base import LEAF_TYPES, CompressedLeaf
from compressjax.core.errors import CompressionError
from compressjax.core.format import Format, format_from_config


def _meta_to_json(v: Any) -> Any:
  if isinstance(v, Format):
    return {"__format__": v.to_config()}
  if isinstance(v, tuple):
    return {"__tuple__": [_meta_to_json(x) for x in v]}
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  raise CompressionError(f"cannot serialize metadata {v!r}")


def _meta_from_json(v: Any) -> Any:
  if isinstance(v, dict) and "__format__" in v:
    return format_from_config(v["__format__"])
  if isinstance(v, dict) and "__tuple__" in v:
    return tuple(_meta_from_json(x) for x in v["__tuple__"])
  return v


def _encode(x: Any, arrays: list) -> Any:
  if isinstance(x, CompressedLeaf):
    return {"t": "leaf", "cls": type(x).__name__,
            "meta": {f: _meta_to_json(getattr(x, f)) for f in x.meta_fields},
            "children": {f: _encode(getattr(x, f), arrays)
                         for f in x.data_fields}}
  if isinstance(x, dict):
    return {"t": "dict", "items": {str(k): _encode(v, arrays)
                                   for k, v in x.items()}}
  if isinstance(x, (list, tuple)):
    return {"t": type(x).__name__, "items": [_encode(v, arrays) for v in x]}
  if x is None:
    return {"t": "none"}
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    arrays.append(np.asarray(jax.device_get(x)))
    return {"t": "array", "i": len(arrays) - 1}
  if isinstance(x, (int, float, str, bool)):
    return {"t": "py", "v": x}
  raise CompressionError(
      f"cannot checkpoint a {type(x).__name__}; convert NNX State with "
      "state.to_pure_dict() first")


def _decode(s: dict, arrays: dict) -> Any:
  t = s["t"]
  if t == "leaf":
    cls = LEAF_TYPES[s["cls"]]
    kw = {f: _meta_from_json(v) for f, v in s["meta"].items()}
    kw.update({f: _decode(v, arrays) for f, v in s["children"].items()})
    return cls(**kw)
  if t == "dict":
    return {k: _decode(v, arrays) for k, v in s["items"].items()}
  if t in ("list", "tuple"):
    items = [_decode(v, arrays) for v in s["items"]]
    return items if t == "list" else tuple(items)
  if t == "none":
    return None
  if t == "array":
    return jnp.asarray(arrays[f"a{s['i']}"])
  return s["v"]


def save(path: str, tree: Any, force: bool = False) -> None:
  """Saves a (compressed) tree to directory `path` (must be new unless force)."""
  arrays: list = []
  spec = _encode(tree, arrays)
  path = os.path.abspath(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(
        arrays=ocp.args.StandardSave({f"a{i}": a for i, a in enumerate(arrays)}),
        structure=ocp.args.JsonSave({"format": 1, "tree": spec})), force=force)


def restore(path: str) -> Any:
  """Restores exactly what `save` wrote: same classes, metadata, dtypes."""
  path = os.path.abspath(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), structure=ocp.args.JsonRestore()))
  tree = _decode(out["structure"]["tree"], out["arrays"] or {})
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(
      x, CompressedLeaf)):
    if isinstance(leaf, CompressedLeaf):
      leaf.validate()
  return tree


def disk_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
