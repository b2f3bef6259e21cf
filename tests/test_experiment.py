"""Smoke tests of the default experiment (experiments/compress_lm.py), its
dataset and its model, run in-process on the tiny smoke config."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.data import stdlib_text
from compressjax.models import transformer
from configs import default as default_config
from configs import smoke
from experiments import compress_lm

FIELDS = ("method", "description", "metric", "value", "bits_per_weight",
          "bits_per_weight_model", "size_bytes", "compression_ratio",
          "seconds")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cj_smoke"))
  config = smoke.get_config()
  result = compress_lm.run_experiment(config, workdir, log=lambda s: None)
  return workdir, config, result


def _rows(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return {r["method"]: r for r in json.load(f)}


def test_results_rows(first_run):
  workdir, config, result = first_run
  assert not result["baseline_cached"]
  rows = _rows(workdir)
  assert list(rows) == compress_lm.parse_methods(config.methods)
  for r in rows.values():
    assert set(FIELDS) <= set(r), r["method"]
    assert r["metric"] == "val_ppl"
    assert math.isfinite(r["value"]) and 1.0 < r["value"] < 256.0
    assert r["size_bytes"] > 0 and r["bits_per_weight"] > 0
  f32, i8, i4 = rows["float32"], rows["int8"], rows["int4_g128"]
  assert f32["compression_ratio"] == pytest.approx(1.0)
  assert f32["bits_per_weight"] == pytest.approx(32.0)
  assert abs(i8["value"] / f32["value"] - 1) < 0.03
  assert i4["size_bytes"] < i8["size_bytes"] < f32["size_bytes"]
  assert rows["nm_2_4+int4"]["size_bytes"] < rows["nm_2_4"]["size_bytes"]
  assert i4["bits_per_weight"] < i8["bits_per_weight"] < 9


def test_output_files(first_run):
  workdir, config, _ = first_run
  md = open(os.path.join(workdir, "results.md")).read()
  for name in compress_lm.parse_methods(config.methods):
    assert f"| {name} |" in md
    assert os.path.getsize(os.path.join(workdir, "summaries",
                                        f"{name}.txt")) > 0
  with open(os.path.join(workdir, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_restores_same_tree(first_run):
  workdir, config, result = first_run
  name = "nm_2_4+int4"
  restored = cj.restore(os.path.join(workdir, "checkpoints", name))
  baseline = cj.restore(os.path.join(workdir, "baseline",
                                     result["baseline_key"], "params"))
  # Compression is deterministic, so recompressing gives the saved tree.
  expected = compress_lm.METHODS[name](config).apply(
      jax.tree.map(jnp.asarray, baseline))
  assert (jax.tree.structure(restored) == jax.tree.structure(expected))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_reuses_cached_baseline(first_run, monkeypatch):
  workdir, config, result = first_run

  def fail(*args, **kwargs):
    raise AssertionError("the cached baseline should have been reused")

  monkeypatch.setattr(compress_lm, "train_baseline", fail)
  config = smoke.get_config()
  # Only compression settings change: the float model must come from cache.
  config.quant.bits = 3
  config.methods = "float32,int4_g128"
  again = compress_lm.run_experiment(config, workdir, log=lambda s: None)
  assert again["baseline_cached"]
  assert again["baseline_key"] == result["baseline_key"]
  rows = {r["method"]: r for r in again["rows"]}
  first = {r["method"]: r for r in result["rows"]}
  assert rows["float32"]["value"] == first["float32"]["value"]
  assert "int3" in rows["int4_g128"]["description"]
  assert rows["int4_g128"]["size_bytes"] < first["int4_g128"]["size_bytes"]


def test_unknown_method_is_rejected():
  with pytest.raises(ValueError, match="unknown method"):
    compress_lm.parse_methods("float32,int7_magic")


def test_default_methods_fit_default_model():
  """Every default row's transform accepts the default model's kernels."""
  c = default_config.get_config()
  model = compress_lm.build_model(c)
  # concrete values: a chain's later parts are initialized on what the
  # earlier ones produce, which data-dependent parts compute from values
  variables = model.init(jax.random.key(0),
                         jnp.zeros((1, c.data.seq_len), jnp.int32))
  paths = {p for p, _ in cj.core.leaves_with_paths(variables)}
  for p in ("params/block_0/attn/query/kernel", "params/block_0/mlp/fc1/kernel",
            "params/head/kernel", "params/embed/embedding"):
    assert p in paths
  # calibrated rows: well-formed stand-in statistics for every kernel
  from compressjax.calibrate import LayerStats
  stats = {}
  for p, x in cj.core.leaves_with_paths(variables):
    if len(x.shape) == 2:
      k = x.shape[0]
      stats[p] = LayerStats(gram=jnp.eye(k), abs_sum=jnp.ones(k),
                            sq_sum=jnp.ones(k), abs_max=jnp.ones(k),
                            count=jnp.asarray(1.0))
  for name in compress_lm.parse_methods(c.methods):
    build = compress_lm.METHODS[name]
    if getattr(build, "trained", False):
      continue  # training rows run end to end in the smoke run
    if getattr(build, "sequential", False):
      t = build(c, stats)  # what sequential applies to each block
    else:
      t = compress_lm.make_transform(name, c, stats, model, batches=[])
    t.init(variables)  # raises on a bad config


def test_split_is_deterministic_and_disjoint():
  kw = dict(max_bytes=300_000, max_val_bytes=50_000)
  tr1, va1, s1 = stdlib_text.load(return_split=True, **kw)
  tr2, va2, s2 = stdlib_text.load(return_split=True, **kw)
  np.testing.assert_array_equal(tr1, tr2)
  np.testing.assert_array_equal(va1, va2)
  assert s1 == s2 and tr1.dtype == va1.dtype == np.uint8
  assert len(tr1) == 300_000 and len(va1) == 50_000
  assert not set(s1.train_files) & set(s1.val_files)
  assert set(s1.val_files) == set(stdlib_text.DEFAULT_VAL_FILES)
  # No validation text appears in the (uncapped) training bytes.
  full_train, _ = stdlib_text.load(max_bytes=None)
  train_bytes = full_train.tobytes()
  for name in s1.val_files:
    src = stdlib_text.read_module(name)
    chunk = src[len(src) // 2:len(src) // 2 + 200]
    assert train_bytes.find(chunk) == -1, name


def test_batches():
  data = np.arange(1000, dtype=np.int64).astype(np.uint8)
  a = list(zip(range(3), stdlib_text.train_batches(data, 16, 4, seed=1)))
  b = list(zip(range(3), stdlib_text.train_batches(data, 16, 4, seed=1)))
  for (_, x), (_, y) in zip(a, b):
    assert x.shape == (4, 17)
    np.testing.assert_array_equal(x, y)
  ev = list(stdlib_text.eval_batches(np.arange(200, dtype=np.uint8), 10, 4))
  # 199 // 10 = 19 windows -> 4 full batches of distinct, aligned windows.
  assert len(ev) == 4
  np.testing.assert_array_equal(ev[0][0], np.arange(11))
  for batches, n in ((ev, 16), (list(stdlib_text.eval_batches(
      np.arange(200, dtype=np.uint8), 10, 4, max_batches=2)), 8)):
    starts = np.concatenate([e[:, 0] for e in batches]).astype(int)
    assert len(starts) == n and starts[0] == 0
    assert starts[-1] >= 150  # spread over the whole set
    assert np.all(np.diff(starts) >= 10) and np.all(starts % 10 == 0)
  with pytest.raises(ValueError, match="not in the module list"):
    stdlib_text.load(val_files="no_such_module.py")
  with pytest.raises(FileNotFoundError, match="not found"):
    stdlib_text.read_module("no_such_module.py")


def test_model_shapes():
  cfg = transformer.TransformerConfig(d_model=16, n_layers=1, n_heads=2,
                                      d_mlp=32, seq_len=8)
  model = transformer.TransformerLM(cfg)
  tokens = jnp.zeros((2, 8), jnp.uint8)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = jax.jit(model.apply)
  assert apply(variables, tokens).shape == (2, 8, 256)
  # Causal: changing a later token leaves earlier logits unchanged.
  t2 = tokens.at[:, 5].set(7)
  y1, y2 = apply(variables, tokens), apply(variables, t2)
  np.testing.assert_allclose(y1[:, :5], y2[:, :5], atol=1e-6)
  assert not np.allclose(y1[:, 5:], y2[:, 5:])
