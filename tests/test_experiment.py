"""The default experiment (experiments/{harness,lm_task,rows,recipes}.py) on
the tiny smoke config: every row kind of the default table runs once, end to
end, in one module fixture; the tests check what the rows claim (sizes equal
their formats' bits, names equal the settings in the trees, sparsity
patterns, the float row equals an independent evaluation of the baseline)."""

import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.transform import Chain
from compressjax.core.tree import leaves_with_paths
from compressjax.data import stdlib_text
from compressjax.models import transformer
from configs import default as default_config
from configs import smoke
from experiments import harness, lm_task, readme_table, recipes, rows

FIELDS = ("method", "description", "metric", "value", "bits_per_weight",
          "bits_per_weight_model", "size_bytes", "compression_ratio",
          "seconds", "eval_seconds", "val_loss", "eval_bytes")
HEAD = "params/head/kernel"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  # At this size XLA compilation is nearly all the time; with most of its
  # optimizations off it is ~2.5x faster (the numbers move slightly, the
  # properties tested here do not).
  prev = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    workdir = str(tmp_path_factory.mktemp("cj_smoke"))
    c = smoke.get_config()
    results, task = lm_task.run(c, workdir, log=lambda s: None)
    yield workdir, c, {r["method"]: r for r in results}, task
  finally:
    jax.config.update("jax_disable_most_optimizations", prev)


def _tree(workdir, name):
  return cj.restore(os.path.join(workdir, "checkpoints",
                                 harness.safe_name(name)))


def _kernels(tree):
  """{path: leaf} of the compressible kernels (attention, MLP, head)."""
  return {p: x for p, x in leaves_with_paths(tree)
          if p.endswith("/kernel")}


def test_every_default_row_kind_runs_at_tiny_size(run):
  workdir, c, res, _ = run
  tiny = smoke.tiny_methods(default_config.get_config().methods)
  assert list(res) == tiny.split(",") == c.methods.split(",")
  with open(os.path.join(workdir, "results.json")) as f:
    assert [r["method"] for r in json.load(f)] == list(res)
  for r in res.values():
    assert set(FIELDS) <= set(r), r["method"]
    assert r["metric"] == "val_ppl"
    assert math.isfinite(r["value"]) and 1.0 < r["value"] < 256.0
    assert r["value"] == pytest.approx(math.exp(r["val_loss"]))
    assert r["size_bytes"] > 0 and r["bits_per_weight"] > 0


def test_float_row_is_the_baseline(run):
  """float32 equals a float64 numpy cross entropy of model.apply (not
  cj.run) over the same validation windows."""
  workdir, c, res, task = run
  _, val, _ = lm_task.load_data(c)
  total = count = 0
  apply = jax.jit(task.model.apply)
  for b in stdlib_text.eval_batches(val, c.data.seq_len, c.eval.batch_size,
                                    c.eval.max_batches):
    logits = np.asarray(apply(task.baseline, b[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    y = b[:, 1:].astype(int)
    total -= np.take_along_axis(logp, y[..., None], -1).sum()
    count += y.size
  f32 = res["float32"]
  assert f32["eval_bytes"] == count
  assert f32["val_loss"] == pytest.approx(total / count, rel=1e-5)
  assert f32["compression_ratio"] == 1.0 and f32["bits_per_weight"] == 32.0
  assert f32["size_bytes"] == sum(x.nbytes for x in
                                  jax.tree.leaves(task.baseline))


def _expected_bits(task, bits_of):
  """bits/w over the kernels, bits_of(path, (K, N)) per kernel."""
  ks = {p: x.shape for p, x in _kernels(task.baseline).items()}
  return (sum(bits_of(p, s) * s[0] * s[1] for p, s in ks.items()) /
          sum(s[0] * s[1] for s in ks.values()))


@pytest.mark.parametrize("name,block_bits", [
    ("int8", lambda s: 8 + 32 / s[0]),
    ("int4_g32", lambda s: 4 + 32 / 32),
    ("int3_g32", lambda s: 3 + 32 / 32),
    ("int2_g32", lambda s: 2 + 32 / 32),
    ("gptq_int3_g32", lambda s: 3 + 32 / 32),
    ("nf4", lambda s: 4 + 32 / 32),
    ("fp8_e4m3", lambda s: 8 + 32 / s[0]),
    ("mxfp4", lambda s: 4 + 8 / 32),
    ("nvfp4", lambda s: 4 + 8 / 16 + 32 / (s[0] * s[1])),
    ("ternary", lambda s: 2 + 32 / s[0]),
    ("unstructured_50", lambda s: 32 * 0.5 + 1),
    ("nm_2_4", lambda s: 32 * 0.5 + 1),
    ("sparsegpt_2_4", lambda s: 32 * 0.5 + 1),
    ("wanda_50", lambda s: 32 * 0.5 + 1),
])
def test_sizes_match_the_formats_bits(run, name, block_bits):
  """bits/w (layers) from true bytes equals the format's arithmetic: code
  bits + float32 scale bits per group (or E8M0 / e4m3 block scales); 50%
  sparse float32 values + a 1-bit mask (or 2-bit 2:4 indices per kept
  value); the head at 8 bits per channel below 8 bits, dense for sparsity."""
  _, c, res, task = run
  r = res[name]
  sparse = name in ("unstructured_50", "nm_2_4", "sparsegpt_2_4", "wanda_50")
  low = name not in ("int8", "fp8_e4m3") and not sparse

  def bits_of(path, s):
    if path == HEAD:
      return 32.0 if sparse else (8 + 32 / s[0] if low else block_bits(s))
    return block_bits(s)

  assert r["bits_per_weight"] == pytest.approx(_expected_bits(task, bits_of),
                                               rel=1e-9)
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(task.baseline))
  assert r["compression_ratio"] == pytest.approx(float_bytes /
                                                 r["size_bytes"])


def test_names_state_the_settings_in_the_trees(run):
  """Every row whose name states bits and a group holds exactly those
  QArrays (head: head_bits per channel), whatever else the config says."""
  workdir, c, res, _ = run
  pat = re.compile(r"(?:.*_)?int(\d)_g(\d+)(?:_seq)?")
  checked = 0
  for name in res:
    m = pat.fullmatch(name)
    if not m or name.startswith(("nm_", "svd_llm")):
      continue
    bits, group = int(m[1]), int(m[2])
    for p, x in _kernels(_tree(workdir, name)).items():
      q = getattr(x, "weight", x)  # InputTransform (AWQ fc2, rotations)
      assert isinstance(q, cj.QArray), (name, p, type(q))
      if p == HEAD:
        assert (q.fmt.bits, q.granularity) == (c.quant.head_bits, "channel")
      else:
        assert (q.fmt.bits, q.group_size) == (bits, group), (name, p)
    checked += 1
  assert checked >= 9  # int4/int3/int2, gptq x3, awq x2, rotation x2, qat
  with pytest.raises(ValueError, match="unknown method"):
    rows.make("int7_magic", c)
  with pytest.raises(ValueError, match="bits must be in"):
    rows.make("int9_g32", c)


def test_sparsity_patterns(run):
  workdir, c, res, _ = run
  for name, frac, nm in (("unstructured_50", 0.5, None), ("wanda_50", 0.5,
                                                          None),
                         ("nm_2_4", 0.5, (2, 4)), ("sparsegpt_2_4", 0.5,
                                                   (2, 4)),
                         ("rigl_90", 0.9, None), ("gmp_90", 0.9, None)):
    for p, x in _kernels(_tree(workdir, name)).items():
      w = np.asarray(cj.materialize_tree(x))
      if p == HEAD:  # sparsity rows leave the head dense
        assert not cj.is_compressed(x) and np.all(w != 0), (name, p)
        continue
      zeros = np.mean(w == 0)
      assert zeros == pytest.approx(frac, abs=0.02), (name, p, zeros)
      if nm:
        n, m = nm
        runs = (w != 0).reshape(-1, m, w.shape[1]).sum(1)
        assert runs.max() <= n, (name, p)


def test_orderings_that_hold_at_tiny_size(run):
  _, _, res, _ = run
  v = {k: r["value"] for k, r in res.items()}
  assert abs(v["int8"] / v["float32"] - 1) < 0.01
  assert abs(v["fp8_e4m3"] / v["float32"] - 1) < 0.02
  assert v["int2_g32"] > v["int3_g32"] > v["int4_g32"] > v["float32"]
  # calibrated beats data-free where the gap is wide even at this size
  # (measured margins 0.15 to 1.3 ppl)
  for calibrated, plain in (("gptq_int3_g32", "int3_g32"),
                            ("awq_int3_g32", "int3_g32"),
                            ("sparsegpt_50", "unstructured_50"),
                            ("sparsegpt_2_4", "nm_2_4"),
                            ("svd_llm", "lowrank")):
    assert v[calibrated] < v[plain], (calibrated, plain)
  assert res["nm_2_4+int4"]["size_bytes"] < res["nm_2_4"]["size_bytes"]
  assert (res["int2_g32"]["size_bytes"] < res["int3_g32"]["size_bytes"] <
          res["int4_g32"]["size_bytes"] < res["int8"]["size_bytes"])


def test_outputs_checkpoints_and_deterministic_rows(run):
  workdir, c, res, task = run
  md = open(os.path.join(workdir, "results.md")).read()
  for name in res:
    assert f"| {name} |" in md
    assert os.path.getsize(os.path.join(
        workdir, "summaries", f"{harness.safe_name(name)}.txt")) > 0
  with open(os.path.join(workdir, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # the README generator reads this results.md
  block = readme_table.table(md)
  assert block.count("\n| ") == len(res) and "| float32 | " in block
  # recompressing gives the saved tree, bit for bit
  ctx = harness.Context(c, task, workdir, log=lambda s: None)
  for name in ("nm_2_4+int4", "gptq_int4_g32"):
    restored, again = _tree(workdir, name), rows.make(name, c).compress(ctx)
    assert jax.tree.structure(restored) == jax.tree.structure(again)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(again)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a finished fine-tuning is reused (no step runs), same params
  tree, facts = recipes.float_recipe(ctx, "float32_ft")
  assert facts["final_loss"] is None
  for a, b in zip(jax.tree.leaves(tree),
                  jax.tree.leaves(_tree(workdir, "float32_ft"))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_reuses_cached_baseline(run, monkeypatch, tmp_path):
  workdir, c, res, task = run

  def fail(*args, **kwargs):
    raise AssertionError("the cached baseline should have been reused")

  monkeypatch.setattr(lm_task, "train_baseline", fail)
  shutil.copytree(os.path.join(workdir, "baseline"), tmp_path / "baseline")
  c = smoke.get_config()
  c.quant.head_bits = 0       # compression settings only: same baseline
  c.methods = "float32"
  again, t2 = lm_task.run(c, str(tmp_path), log=lambda s: None, save=False)
  assert t2.info["baseline_cached"] and t2.key == task.key
  assert again[0]["value"] == res["float32"]["value"]


def test_default_rows_fit_default_model():
  """Every default row's transform accepts the default model's kernels
  (shapes only: init checks rules, groups and scale/rotation plans)."""
  c = default_config.get_config()
  c.model.n_layers = 1  # every block has the same kernel shapes
  model = lm_task.build_model(c)
  # Shapes are all a transform's `init` needs to check its rules and group
  # sizes; a chain's later parts are initialized on what the earlier ones
  # produce, which data-dependent parts compute from values: random ones
  # (drawn in numpy, no compilation).
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, c.data.seq_len), jnp.int32))
  rng = np.random.default_rng(0)
  concrete = jax.tree.map(lambda s: jnp.asarray(
      rng.standard_normal(s.shape), s.dtype), variables)
  from compressjax.calibrate import LayerStats
  stats = {p: LayerStats(gram=jnp.eye(x.shape[0]), abs_sum=jnp.ones(
      x.shape[0]), sq_sum=jnp.ones(x.shape[0]), abs_max=jnp.ones(
          x.shape[0]), count=jnp.asarray(1.0))
           for p, x in leaves_with_paths(variables) if len(x.shape) == 2}
  cfg = lm_task.model_config(c)
  task = harness.Task(
      model=model, baseline=variables, metric="val_ppl", evaluate=None,
      calib_inputs=None, key="shapes", title="shapes", head=HEAD,
      scale_groups=transformer.scale_groups(cfg),
      rotation_plan=transformer.rotation_plan(cfg))
  ctx = harness.Context(c, task, "/nonexistent", stats=stats,
                        calib_inputs=[])
  built = 0
  for row in rows.parse(c.methods, c):
    if row.needs & {"training"} or row.name.endswith("_seq"):
      continue  # they train / calibrate while building: run in the fixture
    t = row.build(ctx)
    if isinstance(t, Chain):
      t.init(concrete)  # raises on a bad config
    else:
      t.init(variables)
    built += 1
  assert built == 31


def test_rows_refuse_what_the_task_lacks(run):
  _, c, _, task = run
  import dataclasses
  bare = dataclasses.replace(task, scale_groups=None, training=None)
  ctx = harness.Context(c, bare, "/nonexistent", log=lambda s: None)
  for name in ("awq_int4_g32", "qat_int4_g32"):
    with pytest.raises(ValueError, match="does not provide"):
      rows.make(name, c).compress(ctx)


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


def test_snapshot_is_pinned_and_readable_like_a_stdlib(tmp_path):
  """The pinned snapshot is the default source; written out as a directory
  and read back as an installed stdlib, it gives the same bytes; a corrupt
  snapshot is refused."""
  files = stdlib_text._snapshot_files()
  assert set(stdlib_text.MODULES) <= set(files) and "LICENSE.txt" in files
  for name in stdlib_text.MODULES:
    (tmp_path / name).write_bytes(files[name])
    compile(files[name], name, "exec")  # real Python source
  a = stdlib_text.load(max_bytes=None, return_split=True)
  b = stdlib_text.load(max_bytes=None, root=str(tmp_path), return_split=True)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[2].digest == b[2].digest
  # write_snapshot round trip (a few modules: xz at -9e is slow)
  few = stdlib_text.MODULES[:3]
  digest = stdlib_text.write_snapshot(str(tmp_path / "s.tar.xz"),
                                      str(tmp_path), modules=few)
  import hashlib
  import tarfile
  blob = (tmp_path / "s.tar.xz").read_bytes()
  assert hashlib.sha256(blob).hexdigest() == digest
  with tarfile.open(tmp_path / "s.tar.xz") as tar:
    assert tar.getnames() == sorted(few)
    assert all(tar.extractfile(n).read() == files[n] for n in few)
  with pytest.raises(ValueError, match="source must be one of"):
    stdlib_text.load(source="pypi")


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
    stdlib_text.read_module("no_such_module.py", source="installed")


def test_model_is_causal(run):
  _, c, _, task = run
  apply = jax.jit(task.model.apply)
  tokens = jnp.zeros((2, c.data.seq_len), jnp.uint8)
  t2 = tokens.at[:, 5].set(7)
  y1, y2 = apply(task.baseline, tokens), apply(task.baseline, t2)
  assert y1.shape == (2, c.data.seq_len, 256)
  # changing a later token leaves earlier logits unchanged
  np.testing.assert_allclose(y1[:, :5], y2[:, :5], atol=1e-6)
  assert not np.allclose(y1[:, 5:], y2[:, 5:])


def test_readme_block_is_rewritten_between_markers():
  md = ("# t\n\n- **environment**: Python 3.11.7\n- **baseline key**: abc\n\n"
        "| method | val ppl | bits/w (layers) | bits/w (model) | size (KiB) "
        "| ratio | seconds | description |\n|---|---:|---:|---:|---:|---:|"
        "---:|---|\n| float32 | 5.322 | 32.00 | 32.00 | 3420.0 | 1.00x | "
        "0.00 | float |\n| int8 | 5.322 | 8.19 | 9.72 | 1041.0 | 3.29x | "
        "1.0 | rtn |\n")
  readme = (f"intro\n{readme_table.BEGIN}\n| old | table |\n"
            f"{readme_table.END}\nrest\n")
  out = readme_table.rewrite(readme, readme_table.table(md))
  assert out.startswith("intro\n") and out.endswith(
      f"{readme_table.END}\nrest\n")
  assert "| old |" not in out
  assert "| int8 | 5.322 | 8.19 | 9.72 | 3.29x |" in out
  assert "Python 3.11.7" in out and "abc" in out
  # idempotent
  assert readme_table.rewrite(out, readme_table.table(md)) == out
  with pytest.raises(ValueError, match="exactly one"):
    readme_table.rewrite("no markers", "x")
  with pytest.raises(ValueError, match="no column"):
    readme_table.table(md, ("method", "perplexity"))


def test_seed_sweep_orderings_table(tmp_path):
  from experiments import seed_sweep
  names = ["int4_g128", "gptq_int4_g128", "awq_int4_g128", "lowrank"]
  assert seed_sweep.orderings(names) == [("gptq_int4_g128", "int4_g128"),
                                         ("awq_int4_g128", "int4_g128")]
  recs = [dict(seed=s, calib_seed=1, method=n, value=v)
          for s, vals in ((0, (5.0, 4.9, 5.1, 6.0)), (1, (5.0, 4.8, 4.9,
                                                          6.0)))
          for n, v in zip(names, vals)]
  text = seed_sweep.write(str(tmp_path), recs, names)
  assert "gptq_int4_g128 <= int4_g128: 2/2" in text
  assert "awq_int4_g128 <= int4_g128: 1/2" in text and "**no**" in text
  assert json.loads((tmp_path / "sweep.json").read_text()) == recs
