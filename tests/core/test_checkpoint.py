"""orbax checkpoints: exact round trips, real sizes on disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.checkpoint import disk_bytes

T = cj.transforms


def _params():
  return {"params": {
      "a": {"kernel": jax.random.normal(jax.random.key(0), (256, 128)),
            "bias": jnp.zeros(128, jnp.bfloat16)},
      "b": [jax.random.normal(jax.random.key(1), (128, 64)), None],
      "n": 3}}


@pytest.mark.parametrize("t", [
    T.quantize(4, group_size=64, scale_dtype=jnp.bfloat16),
    T.quantize(3, symmetric=False),
    cj.chain(T.sparsify(pattern="nm", n=2, m=4), T.quantize(4)),
    cj.chain(T.sparsify(0.7), T.quantize(8)),
    T.sparsify(0.5, pattern="block", block=(16, 16)),
    cj.chain(T.low_rank(rank=8, residual=True), T.quantize(2)),
], ids=["int4", "int3asym", "nm_int4", "unstr_int8", "block", "lr_q2"])
def test_roundtrip_exact(tmp_path, t):
  c = t.apply(_params())
  cj.save(tmp_path / "ck", c)
  r = cj.restore(tmp_path / "ck")
  is_leaf = cj.is_compressed
  assert jax.tree.structure(r, is_leaf=is_leaf) == jax.tree.structure(
      c, is_leaf=is_leaf)
  for x, y in zip(jax.tree.leaves(r, is_leaf=is_leaf),
                  jax.tree.leaves(c, is_leaf=is_leaf)):
    assert type(x) is type(y)
    if cj.is_compressed(x):
      assert all(getattr(x, f) == getattr(y, f) for f in x.meta_fields)
  for x, y in zip(jax.tree.leaves(r), jax.tree.leaves(c)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert r["params"]["n"] == 3 and r["params"]["b"][1] is None


def test_disk_size_matches_memory(tmp_path):
  p = _params()
  c = cj.quantize(p, 4, group_size=128)
  cj.save(tmp_path / "q", c)
  cj.save(tmp_path / "f", p)
  q_disk, f_disk = disk_bytes(tmp_path / "q"), disk_bytes(tmp_path / "f")
  # no float copy: at most the in-memory bytes plus container overhead
  assert q_disk <= cj.tree_nbytes(c) + 64 * 1024
  assert f_disk >= 4 * q_disk
  assert cj.tree_nbytes(p) / cj.tree_nbytes(c) > 6.5


# -- atomicity, checksums, clear errors ---------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from compressjax.core import checkpoint as ckpt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
OLD = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "tag": 1}
SMALL = {"params": {"a": {"kernel": np.random.default_rng(0).standard_normal(
    (64, 64), np.float32)}}}
NEW = {"w": np.full((64, 64), 7.0, np.float32), "tag": 2}

# The child saves NEW over the checkpoint at argv[1] and SIGKILLs itself
# after the new arrays are written, before the manifest is replaced (the
# commit point).
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from compressjax.core import checkpoint as ckpt
    def die(*a, **k):
      os.kill(os.getpid(), signal.SIGKILL)
    ckpt._write_manifest = die
    ckpt.save(sys.argv[1], {"w": np.full((64, 64), 7.0, np.float32),
                            "tag": 2}, force=True)
    print("not killed")
""")


def _host(x):
  if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def _same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert getattr(x, "dtype", None) == getattr(y, "dtype", None)
    np.testing.assert_array_equal(_host(x), _host(y))


def _next_save_cleans_up(path):
  cj.save(path, NEW, force=True)
  _same(cj.restore(path), NEW)
  assert sorted(n[:5] for n in os.listdir(path)) == ["compr", "data-"]


def test_process_killed_while_saving_keeps_the_old_checkpoint(tmp_path):
  path = str(tmp_path / "ck")
  cj.save(path, OLD)
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, str(script), path], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]  # really killed
  assert "not killed" not in proc.stdout
  # it died with the new arrays written (two data dirs now), uncommitted
  assert len([n for n in os.listdir(path) if n.startswith("data-")]) == 2
  _same(cj.restore(path), OLD)
  _next_save_cleans_up(path)


def test_interrupted_after_the_commit_gives_the_new_checkpoint(
    tmp_path, monkeypatch):
  # Nothing in save catches this, so the disk is as a kill at that point
  # would leave it: new manifest and data, old data not yet deleted.
  path = str(tmp_path / "ck")
  cj.save(path, OLD)
  real = ckpt._write_manifest

  def commit_then_stop(*a, **k):
    real(*a, **k)
    raise KeyboardInterrupt
  monkeypatch.setattr(ckpt, "_write_manifest", commit_then_stop)
  with pytest.raises(KeyboardInterrupt):
    cj.save(path, NEW, force=True)
  monkeypatch.undo()
  assert len([n for n in os.listdir(path) if n.startswith("data-")]) == 2
  _same(cj.restore(path), NEW)
  _next_save_cleans_up(path)


def test_new_checkpoint_appears_whole_or_not_at_all(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise KeyboardInterrupt  # e.g. Ctrl-C between the write and the rename
  monkeypatch.setattr(ckpt, "_write_manifest", boom)
  with pytest.raises(KeyboardInterrupt):
    cj.save(tmp_path / "ck", OLD)
  assert os.listdir(tmp_path) == []  # no checkpoint and no leftovers


def _spec_node(spec, *keys):
  for k in keys:
    spec = dict((kk, v) for kk, v in spec["items"])[k]
  return spec


def _data_files(path):
  out = []
  for root, _, files in os.walk(path):
    out += [os.path.join(root, f) for f in files if "/d/" in root + "/"
            and "data-" in root]
  return sorted(out, key=os.path.getsize)


def test_flipped_bytes_and_damaged_manifest_are_detected(tmp_path):
  path = tmp_path / "ck"
  c = T.quantize(4).apply(SMALL)
  cj.save(path, c)
  big = _data_files(path)[-1]  # the file holding the packed codes
  raw = bytearray(open(big, "rb").read())
  mid = len(raw) // 2
  raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
  open(big, "wb").write(bytes(raw))
  with pytest.raises(cj.CompressionError, match=(
      r"array a0 fails its SHA-256 checksum: a data file is damaged.*"
      r"\[param 'params/a/kernel/codes'\]")) as e:
    cj.restore(path)  # (format 1 restored these codes silently)
  assert str(path) in str(e.value)
  # the spec is checksummed too: a changed metadata value is caught
  cj.save(path, c, force=True)
  man = path / ckpt.MANIFEST
  m = json.loads(man.read_text())
  _spec_node(m["spec"], "params", "a", "kernel")["meta"]["axis"] = 1
  man.write_text(json.dumps(m))
  with pytest.raises(cj.CompressionError, match=r"spec in compressjax.json "
                     r"fails its SHA-256 checksum"):
    cj.restore(path)


def test_array_checksum_names_the_param(tmp_path, monkeypatch):
  path = tmp_path / "ck"
  cj.save(path, {"layer": {"kernel": np.ones((4, 4), np.float32)}})
  real = ckpt._read_arrays
  monkeypatch.setattr(ckpt, "_read_arrays", lambda d, w: {
      k: np.asarray(v) + 1 for k, v in real(d, w).items()})
  with pytest.raises(cj.CompressionError, match=r"a0 fails its SHA-256 "
                     r"checksum.*\[param 'layer/kernel'\]"):
    cj.restore(path)


def test_restore_errors_name_the_path_and_the_fix(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(cj.CompressionError, match=r"the directory is empty"):
    cj.restore(empty)
  with pytest.raises(cj.CompressionError, match="does not exist"):
    cj.restore(tmp_path / "nope")
  plain = tmp_path / "plain"
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    c.save(plain, {"w": np.ones(3)})
  with pytest.raises(cj.CompressionError, match=r"orbax checkpoint that "
                     r"cj.save did not write .*restore it with orbax"):
    cj.restore(plain)
  # a missing data file
  gone = tmp_path / "gone"
  cj.save(gone, OLD)
  os.remove(_data_files(gone)[-1])
  with pytest.raises(cj.CompressionError, match=rf"{gone}.*damaged or "
                     r"missing: restore from another copy"):
    cj.restore(gone)
  # a leaf class this process does not define
  unk = tmp_path / "unknown"
  cj.save(unk, T.quantize(4).apply(SMALL))
  m = json.loads((unk / ckpt.MANIFEST).read_text())
  leaf = _spec_node(m["spec"], "params", "a", "kernel")
  leaf["cls"], leaf["ref"] = "Gone", {"module": "mypkg.leaves", "name": "Gone"}
  m["spec_sha256"] = ckpt._spec_digest(m["spec"])
  (unk / ckpt.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(cj.CompressionError, match=r"class mypkg.leaves.Gone, "
                     r"which is not defined here; import mypkg.leaves before "
                     r"restore \[param 'params/a/kernel'\]"):
    cj.restore(unk)
  # a newer format version
  m["version"] = ckpt.VERSION + 1
  (unk / ckpt.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(cj.CompressionError, match="upgrade compressjax"):
    cj.restore(unk)


def test_save_never_clobbers(tmp_path):
  cj.save(tmp_path / "ck", OLD)
  with pytest.raises(cj.CompressionError, match="pass force=True"):
    cj.save(tmp_path / "ck", NEW)
  _same(cj.restore(tmp_path / "ck"), OLD)
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(cj.CompressionError, match="not a compressjax "
                     "checkpoint; refusing to overwrite"):
    cj.save(mine, OLD, force=True)
  assert (mine / "notes.txt").read_text() == "keep me"
  with pytest.raises(cj.CompressionError, match="cannot checkpoint a set"):
    cj.save(tmp_path / "bad", {"s": {1, 2}})
  assert not (tmp_path / "bad").exists()


def test_format1_checkpoints_still_restore(tmp_path):
  import orbax.checkpoint as ocp
  spec = {"t": "dict", "items": {"w": {"t": "array", "i": 0},
                                 "n": {"t": "py", "v": 3}}}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
    c.save(tmp_path / "v1", ocp.args.Composite(
        arrays=ocp.args.StandardSave({"a0": np.ones((2, 2), np.float32)}),
        structure=ocp.args.JsonSave({"format": 1, "tree": spec})))
  r = cj.restore(tmp_path / "v1")
  assert r["n"] == 3 and np.asarray(r["w"]).sum() == 4
  cj.save(tmp_path / "v1", NEW, force=True)  # upgraded in place
  _same(cj.restore(tmp_path / "v1"), NEW)


# -- NNX ---------------------------------------------------------------------

def test_nnx_state_checkpoints_directly(tmp_path):
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)  # holds a PRNG key variable

  model = Net(nnx.Rngs(0))
  state = nnx.state(model)
  q = cj.quantize(state, 4, group_size=4)  # compressed leaves inside Params
  for tree in (state, q):
    cj.save(tmp_path / "ck", tree, force=True)
    r = cj.restore(tmp_path / "ck")
    assert isinstance(r, nnx.State)
    is_leaf = cj.is_compressed
    assert jax.tree.structure(r, is_leaf=is_leaf) == jax.tree.structure(
        tree, is_leaf=is_leaf)
    assert sorted(r["layers"].keys()) == [0, 1]  # ints, not strings
  r = cj.restore(tmp_path / "ck")
  assert isinstance(r["layers"][0]["kernel"].get_value(), cj.QArray)
  # exactly what nnx.update takes: a fresh model ends up equal to the first
  other = Net(nnx.Rngs(1))
  cj.save(tmp_path / "s", state)
  nnx.update(other, cj.restore(tmp_path / "s"))
  _same(nnx.state(other), state)
  # pure dicts keep their int keys for nnx.replace_by_pure_dict
  cj.save(tmp_path / "pure", nnx.to_pure_dict(state))
  pure = cj.restore(tmp_path / "pure")
  assert list(pure["layers"]) == [0, 1]
  target = nnx.state(Net(nnx.Rngs(2)))
  nnx.replace_by_pure_dict(target, pure)
  _same(target, state)
