"""Checkpoints of (compressed) trees: exact, atomic, checksummed.

Layout of a checkpoint directory `path` (format version 2):

  path/compressjax.json    the manifest: format name and version, the name of
                           the data directory, the tree's spec (structure,
                           compressed-leaf classes and static metadata, and
                           per array its param path, dtype, shape and
                           SHA-256) and the SHA-256 of that spec
  path/data-<hex>/         the arrays (codes, scales, packed masks, ...; never
                           a float copy), one orbax StandardCheckpointHandler
                           checkpoint

so `restore(path)` rebuilds the tree with no template and verifies every
array and the spec against their checksums. Trees may hold dicts (str or int
keys, kept as they are: an `nnx.List`'s indices come back as ints), lists,
tuples, None, arrays (PRNG key arrays too), Python scalars, compressed
leaves, and NNX `State` / `Variable` nodes (`cj.save(path, nnx.state(model))`
restores an `nnx.State` that `nnx.update` takes).

Atomicity. A new checkpoint is written to a hidden temporary directory beside
`path` and renamed onto it. Overwriting (`force=True`) writes a new data
directory inside `path`, then replaces the manifest with `os.replace` (atomic)
and only then deletes the old data: a process killed at any point leaves the
old checkpoint or the new one, never neither (leftovers of an interrupted
save are removed by the next save).

Format versions: 2 (this layout); 1 (an orbax composite checkpoint with
`arrays` and `structure` items, no checksums) is still read. A newer version
is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from compressjax.core.base import LEAF_TYPES, CompressedLeaf
from compressjax.core.errors import CompressionError
from compressjax.core.format import Format, format_from_config

FORMAT = "compressjax-checkpoint"
VERSION = 2
MANIFEST = "compressjax.json"
_DATA = "data-"
_TMP = ".cj-tmp-"
# modules restore may import to find a class a checkpoint names
_IMPORTABLE = ("compressjax.", "flax.")


# -- encoding ----------------------------------------------------------------

def _meta_to_json(v: Any, where: str) -> Any:
  if isinstance(v, Format):
    return {"__format__": v.to_config()}
  if isinstance(v, tuple):
    return {"__tuple__": [_meta_to_json(x, where) for x in v]}
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(
      v, np.generic)):
    return {"__dtype__": np.dtype(v).name}
  raise CompressionError(
      f"cannot checkpoint metadata {v!r} of type {type(v).__name__} (only "
      "formats, tuples, dtypes, str, int, float, bool and None)", where)


def _meta_from_json(v: Any) -> Any:
  if isinstance(v, dict) and "__format__" in v:
    return format_from_config(v["__format__"])
  if isinstance(v, dict) and "__tuple__" in v:
    return tuple(_meta_from_json(x) for x in v["__tuple__"])
  if isinstance(v, dict) and "__dtype__" in v:
    return jnp.dtype(v["__dtype__"])
  return v


def _class_ref(cls: type) -> dict[str, str]:
  return {"module": cls.__module__, "name": cls.__qualname__}


def _nnx():
  """flax.nnx when it is loaded (a tree cannot hold NNX nodes otherwise)."""
  return sys.modules.get("flax.nnx")


def _is_frozen_dict(x: Any) -> bool:
  core = sys.modules.get("flax.core")
  return core is not None and isinstance(x, core.FrozenDict)


def _join(path: str, k: Any) -> str:
  return f"{path}/{k}" if path else str(k)


def _digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(
      np.uint8)).hexdigest()


class _Encoder:
  """Tree -> JSON spec + list of host arrays (each with its checksum)."""

  def __init__(self):
    self.arrays: list[np.ndarray] = []

  def array(self, x: Any, path: str) -> dict:
    key_impl = None
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      key_impl = str(jax.random.key_impl(x))
      x = jax.random.key_data(x)
    a = np.asarray(jax.device_get(x))
    self.arrays.append(a)
    out = {"t": "array", "i": len(self.arrays) - 1, "path": path,
           "dtype": a.dtype.name, "shape": list(a.shape),
           "sha256": _digest(a)}
    if key_impl is not None:
      out["key_impl"] = key_impl
    return out

  def __call__(self, x: Any, path: str = "") -> Any:
    nnx = _nnx()
    if isinstance(x, CompressedLeaf):
      cls = type(x)
      return {"t": "leaf", "cls": cls.__name__, "ref": _class_ref(cls),
              "meta": {f: _meta_to_json(getattr(x, f), path)
                       for f in x.meta_fields},
              "children": {f: self(getattr(x, f), _join(path, f))
                           for f in x.data_fields}}
    if nnx is not None and isinstance(x, nnx.Variable):
      meta = x.get_metadata()
      return {"t": "nnx_var", "ref": _class_ref(type(x)),
              "meta": {k: _meta_to_json(v, path) for k, v in meta.items()},
              "value": self(x.get_value(), path)}
    if nnx is not None and isinstance(x, nnx.State):
      return {"t": "nnx_state", "items": self.items(dict(x.raw_mapping),
                                                    path)}
    if isinstance(x, dict):
      return {"t": "dict", "items": self.items(x, path)}
    if _is_frozen_dict(x):
      return {"t": "frozen_dict", "items": self.items(dict(x), path)}
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
      return {"t": type(x).__name__,
              "items": [self(v, _join(path, i)) for i, v in enumerate(x)]}
    if x is None:
      return {"t": "none"}
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return self.array(x, path)
    if isinstance(x, (bool, int, float, str)):
      return {"t": "py", "v": x}
    raise CompressionError(
        f"cannot checkpoint a {type(x).__name__}: trees may hold dicts, "
        "lists, tuples, None, arrays, Python scalars, compressed leaves and "
        "NNX State / Variable nodes; convert this node to one of those", path)

  def items(self, d: dict, path: str) -> list:
    out = []
    for k, v in d.items():
      if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise CompressionError(
            f"cannot checkpoint a dict key {k!r} of type {type(k).__name__} "
            "(keys must be str or int)", path)
      out.append([k, self(v, _join(path, k))])
    return out


def _find_class(ref: dict, registry: dict | None, what: str, path: str):
  """The class a checkpoint names: from `registry`, or imported (compressjax
  and flax modules only), or from an already imported module."""
  name, module = ref["name"], ref["module"]
  if registry is not None and name in registry:
    return registry[name]
  if module.startswith(_IMPORTABLE) and module not in sys.modules:
    try:
      importlib.import_module(module)
    except ImportError:
      pass
  if registry is not None and name in registry:
    return registry[name]
  obj = sys.modules.get(module)
  for part in name.split("."):
    obj = getattr(obj, part, None) if obj is not None else None
  if obj is None:
    where = f"{module}.{name}" if module else name
    raise CompressionError(
        f"checkpoint holds a {what} of class {where}, which is not defined "
        f"here; import {module or 'the module that defines it'} before "
        "restore", path)
  return obj


class _Decoder:
  def __init__(self, arrays: dict[str, Any], verify: bool, where: str):
    self.arrays, self.verify, self.where = arrays, verify, where

  def array(self, s: dict) -> Any:
    key = f"a{s['i']}"
    path = s.get("path", key)
    if key not in self.arrays:
      raise CompressionError(
          f"checkpoint {self.where} lacks array {key}; its data directory is "
          "incomplete: restore from another copy or save again", path)
    a = np.asarray(self.arrays[key])
    if self.verify:
      if a.dtype.name != s["dtype"] or list(a.shape) != s["shape"]:
        raise CompressionError(
            f"checkpoint {self.where}: array {key} reads as {a.dtype.name}"
            f"{tuple(a.shape)}, the spec says {s['dtype']}{tuple(s['shape'])};"
            " the data files are damaged: restore from another copy", path)
      if _digest(a) != s["sha256"]:
        raise CompressionError(
            f"checkpoint {self.where}: array {key} fails its SHA-256 "
            "checksum: a data file is damaged; restore from another copy or "
            "save again", path)
    if "key_impl" in s:
      return jax.random.wrap_key_data(a, impl=s["key_impl"])
    return jnp.asarray(a)

  def __call__(self, s: dict, path: str = "") -> Any:
    t = s["t"]
    if t == "leaf":
      cls = _find_class(s.get("ref", {"name": s["cls"], "module": ""}),
                        LEAF_TYPES, "compressed leaf", path)
      kw = {f: _meta_from_json(v) for f, v in s["meta"].items()}
      kw.update({f: self(v, _join(path, f))
                 for f, v in s["children"].items()})
      try:
        return cls(**kw)
      except TypeError as e:
        raise CompressionError(
            f"checkpoint's {cls.__name__} fields do not fit the class here "
            f"({e}); it was written by another version of its module", path
        ) from None
    if t == "nnx_var":
      cls = _find_class(s["ref"], None, "NNX Variable", path)
      meta = {k: _meta_from_json(v) for k, v in s["meta"].items()}
      return cls.from_metadata(self(s["value"], path), meta)
    if t == "nnx_state":
      from flax import nnx
      return nnx.State({k: self(v, _join(path, k)) for k, v in s["items"]})
    if t == "frozen_dict":
      from flax.core import FrozenDict
      return FrozenDict({k: self(v, _join(path, k)) for k, v in s["items"]})
    if t == "dict":
      items = s["items"]
      if isinstance(items, dict):  # format 1: keys as strings
        return {k: self(v, _join(path, k)) for k, v in items.items()}
      return {k: self(v, _join(path, k)) for k, v in items}
    if t in ("list", "tuple"):
      items = [self(v, _join(path, i)) for i, v in enumerate(s["items"])]
      return items if t == "list" else tuple(items)
    if t == "none":
      return None
    if t == "array":
      return self.array(s)
    if t == "py":
      return s["v"]
    raise CompressionError(f"checkpoint {self.where} has an unknown node "
                           f"kind {t!r}; it was written by a newer version",
                           path)


def _spec_digest(spec: Any) -> str:
  text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


# -- files -------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_arrays(directory: str | None, arrays: list[np.ndarray]) -> None:
  if directory is None:  # a tree without arrays
    return
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(directory, ocp.args.StandardSave(
        {f"a{i}": a for i, a in enumerate(arrays)}))


def _write_manifest(directory: str, manifest: dict, name: str) -> None:
  """Writes `manifest` to directory/name via a temporary file + os.replace."""
  tmp = os.path.join(directory, f"{_TMP}{uuid.uuid4().hex}.json")
  with open(tmp, "w") as f:
    json.dump(manifest, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, name))  # the commit point
  _fsync_dir(directory)


def _is_ours(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, MANIFEST))
          or _is_format1(path))


def _is_format1(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, "structure"))
          and os.path.isdir(os.path.join(path, "arrays")))


def _remove(p: str) -> None:
  if os.path.isdir(p) and not os.path.islink(p):
    shutil.rmtree(p, ignore_errors=True)
  else:
    try:
      os.remove(p)
    except OSError:
      pass


def _cleanup_parent(parent: str, base: str) -> None:
  """Leftovers of interrupted saves of `base` beside it."""
  prefix = f".{base}{_TMP}"
  for n in os.listdir(parent):
    if n.startswith(prefix):
      _remove(os.path.join(parent, n))


def save(path: str | os.PathLike, tree: Any, force: bool = False) -> None:
  """Saves a (compressed) tree to directory `path` (see the module doc).

  `path` must not exist (or be an empty directory) unless `force`, which
  replaces an existing compressjax checkpoint atomically; any other existing
  directory is left alone (an error says so).
  """
  path = os.path.abspath(os.fspath(path))
  enc = _Encoder()
  spec = enc(tree)  # fails on an unsupported node before touching the disk
  manifest = {"format": FORMAT, "version": VERSION, "spec": spec,
              "spec_sha256": _spec_digest(spec)}
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _cleanup_parent(parent, base)
  data = f"{_DATA}{uuid.uuid4().hex}" if enc.arrays else None
  manifest["data"] = data
  exists = os.path.lexists(path)
  if exists and not os.path.isdir(path):
    raise CompressionError(f"cannot save to {path}: it exists and is not a "
                           "directory; choose another path")
  if exists and os.listdir(path):
    if not _is_ours(path):
      raise CompressionError(
          f"cannot save to {path}: it is a non-empty directory that is not a "
          "compressjax checkpoint; refusing to overwrite it (delete it or "
          "choose another path)")
    if not force:
      raise CompressionError(
          f"checkpoint {path} already exists; pass force=True to replace it "
          "(atomically: a failed save keeps the old one)")
    _replace(path, data, enc.arrays, manifest)
    return
  tmp = os.path.join(parent, f".{base}{_TMP}{uuid.uuid4().hex}")
  os.makedirs(tmp)
  try:
    _write_arrays(data and os.path.join(tmp, data), enc.arrays)
    _write_manifest(tmp, manifest, MANIFEST)
    if exists:
      os.rmdir(path)  # empty: rename needs it gone on some systems
    os.rename(tmp, path)  # the commit point
    _fsync_dir(parent)
  except BaseException:
    _remove(tmp)
    raise


def _replace(path: str, data: str, arrays: list, manifest: dict) -> None:
  keep = {MANIFEST, data}
  for n in os.listdir(path):  # leftovers of an interrupted replace
    if n.startswith(_TMP) or (n.startswith(_DATA) and not _referenced(
        path, n)):
      _remove(os.path.join(path, n))
  _write_arrays(data and os.path.join(path, data), arrays)
  _write_manifest(path, manifest, MANIFEST)
  # committed: the old data (and a format-1 checkpoint's items) can go
  for n in os.listdir(path):
    if n not in keep:
      _remove(os.path.join(path, n))


def _referenced(path: str, name: str) -> bool:
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f).get("data") == name
  except (OSError, ValueError, AttributeError):
    return False


def _read_arrays(directory: str, where: str) -> dict[str, Any]:
  if not os.path.isdir(directory):
    raise CompressionError(
        f"checkpoint {where} lacks its data directory "
        f"{os.path.basename(directory)}; the checkpoint is incomplete: "
        "restore from another copy or save again")
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      return ckptr.restore(directory, ocp.args.StandardRestore()) or {}
  except CompressionError:
    raise
  except Exception as e:  # tensorstore / orbax: a damaged or missing file
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise CompressionError(
        f"cannot read the arrays of checkpoint {where} ({type(e).__name__}: "
        f"{first}); its data files are damaged or missing: restore from "
        "another copy or save again") from e


def _describe_dir(path: str) -> str:
  names = sorted(os.listdir(path))
  orbax_marks = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt",
                 "commit_success.txt")
  if any(n in orbax_marks for n in names):
    return (f"{path} is an orbax checkpoint that cj.save did not write (no "
            f"{MANIFEST}); restore it with orbax itself, e.g. "
            "orbax.checkpoint.StandardCheckpointer().restore(path)")
  shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
  return (f"{path} is not a compressjax checkpoint (no {MANIFEST}; it holds "
          f"{shown}); pass the directory cj.save wrote")


def restore(path: str | os.PathLike) -> Any:
  """Restores exactly what `save` wrote: same classes, metadata, dtypes,
  dict keys; every array and the spec checked against their SHA-256."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise CompressionError(f"no checkpoint at {path}: it does not exist; "
                           "check the path")
  if not os.path.isdir(path):
    raise CompressionError(f"no checkpoint at {path}: it is a file, not a "
                           "checkpoint directory; pass the directory cj.save "
                           "wrote")
  man = os.path.join(path, MANIFEST)
  if not os.path.isfile(man):
    if _is_format1(path):
      return _restore_format1(path)
    if not os.listdir(path):
      raise CompressionError(
          f"no checkpoint at {path}: the directory is empty (nothing was "
          "saved there, or a save never committed); pass the directory "
          "cj.save wrote")
    raise CompressionError(_describe_dir(path))
  try:
    with open(man) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CompressionError(
        f"checkpoint {path}: {MANIFEST} is unreadable ({e}); the checkpoint "
        "is damaged: restore from another copy") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CompressionError(f"checkpoint {path}: {MANIFEST} is not a "
                           "compressjax manifest; the file is damaged")
  version = manifest.get("version")
  if not isinstance(version, int) or version > VERSION:
    raise CompressionError(
        f"checkpoint {path} has format version {version!r}, newer than this "
        f"compressjax reads ({VERSION}); upgrade compressjax")
  spec = manifest.get("spec")
  if _spec_digest(spec) != manifest.get("spec_sha256"):
    raise CompressionError(
        f"checkpoint {path}: the tree spec in {MANIFEST} fails its SHA-256 "
        "checksum; the manifest is damaged: restore from another copy")
  data = manifest.get("data")
  arrays = {} if data is None else _read_arrays(
      os.path.join(path, str(data)), path)
  tree = _Decoder(arrays, verify=True, where=path)(spec)
  _validate(tree)
  return tree


def _restore_format1(path: str) -> Any:
  logging.warning("checkpoint %s has format version 1 (no checksums); save "
                  "it again to upgrade it", path)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      out = ckptr.restore(path, ocp.args.Composite(
          arrays=ocp.args.StandardRestore(),
          structure=ocp.args.JsonRestore()))
  except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise CompressionError(
        f"cannot read format-1 checkpoint {path} ({type(e).__name__}: "
        f"{first}); its files are damaged or missing") from e
  tree = _Decoder(out["arrays"] or {}, verify=False, where=path)(
      out["structure"]["tree"])
  _validate(tree)
  return tree


def _validate(tree: Any) -> None:
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(
      x, CompressedLeaf)):
    if isinstance(leaf, CompressedLeaf):
      leaf.validate()


def disk_bytes(path: str | os.PathLike) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
