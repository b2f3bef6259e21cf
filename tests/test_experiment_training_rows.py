"""The adapter and learned-rounding rows of experiments/rows.py (lora_r8,
qlora_nf4_r8, lora/loftq_int{b}_g{g}_r{r}, adaround/lwc/lwc_adaround_int{b}
_g{g}) at tiny size, on a random-init baseline: the trees hold what the
names state, sizes count base + adapters, AdaRound keeps RTN's scales and
lowers every layer's calibration error below RTN's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.tree import leaves_with_paths
from compressjax.train import adapters
from configs import adapters as adapters_config
from configs import default as default_config
from configs import reconstruct as reconstruct_config
from configs import smoke
from experiments import harness, lm_task, rows

HEAD = "params/head/kernel"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  prev = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    c = smoke.get_config()
    c.finetune.steps = 4
    c.finetune.warmup = 1
    c.reconstruct.iters = 60
    c.calib.batches = 2
    model = lm_task.build_model(c)
    base = model.init(jax.random.key(0), jnp.zeros((1, c.data.seq_len),
                                                   jnp.int32))
    task = lm_task.task(c, str(tmp_path_factory.mktemp("rows")),
                        log=lambda s: None, baseline=base)
    yield harness.Context(c, task, str(tmp_path_factory.mktemp("work")),
                          log=lambda s: None)
  finally:
    jax.config.update("jax_disable_most_optimizations", prev)


def _kernels(tree):
  return {p: x for p, x in leaves_with_paths(tree) if p.endswith("/kernel")}


def test_configs_name_rows_that_parse():
  for mod, kinds in ((adapters_config, {"training"}),
                     (reconstruct_config, {"stats"})):
    c = mod.get_config()
    parsed = rows.parse(c.methods, c)
    new = [r for r in parsed if r.name.startswith(
        ("lora", "qlora", "loftq", "adaround", "lwc"))]
    assert new and all(r.needs == kinds for r in new)
  c = adapters_config.get_config()
  d = rows.make("loftq_int2_g64_r8", c).description
  assert "rank-8" in d and "int2" in d and "groups of 64" in d
  assert f"{c.finetune.steps} steps" in d and "LoftQ" in d
  with pytest.raises(ValueError, match="rank must be >= 1"):
    rows.make("qlora_nf4_r0", c)
  with pytest.raises(ValueError, match="bits must be in"):
    rows.make("adaround_int9_g128", c)


def test_qlora_row_is_nf4_base_plus_trained_adapters(ctx):
  tree = rows.make("qlora_nf4_r4", ctx.config).compress(ctx)
  ks = _kernels(tree)
  assert ks and all(isinstance(x, adapters.LoRA) for x in ks.values())
  for p, x in ks.items():
    assert x.rank == 4 and isinstance(x.base, cj.QArray)
    if p == HEAD:  # head_bits per channel, no double quantization
      assert (x.base.fmt.bits, x.base.granularity) == (8, "channel")
    else:
      assert x.base.fmt.name == "nf4"
      assert x.base.group_size == ctx.config.quant.nf4_group_size
      assert cj.is_compressed(x.base.scale)  # double-quantized scales
  # trained: b left zero; the size is the base's plus the float32 factors
  assert any(float(jnp.abs(x.b).max()) > 0 for x in ks.values())
  m = harness.measure(ctx.baseline, tree)
  assert m["size_bytes"] == cj.tree_nbytes(tree)
  assert sum(x.a.nbytes + x.b.nbytes for x in ks.values()) < m["size_bytes"]
  assert np.isfinite(ctx.task.evaluate(tree)["value"])


def test_loftq_row_bases_are_the_named_int_format(ctx):
  tree = rows.make("loftq_int2_g32_r4", ctx.config).compress(ctx)
  for p, x in _kernels(tree).items():
    q = x.base
    if p == HEAD:
      assert (q.fmt.bits, q.granularity) == (8, "channel")
    else:
      assert (q.fmt.bits, q.group_size) == (2, 32)


def test_adaround_row_keeps_rtn_scales_and_lowers_layer_errors(ctx):
  c = ctx.config
  ada = _kernels(rows.make("adaround_int3_g32", c).compress(ctx))
  rtn = _kernels(rows.make("int3_g32", c).compress(ctx))
  assert ada.keys() == rtn.keys()
  for p, q in ada.items():
    r = rtn[p]
    assert isinstance(q, cj.QArray) and q.fmt == r.fmt
    assert q.group_size == r.group_size
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(r.scale))
    w = np.asarray(dict(leaves_with_paths(ctx.baseline))[p], np.float64)
    h = np.asarray(ctx.stats[p].gram, np.float64)

    def err(x):
      d = w - np.asarray(x.materialize(), np.float64)
      return float(np.sum(d * (h @ d)))
    assert err(q) < err(r), p


def test_gptq_adaround_row_starts_from_gptq(ctx):
  c = ctx.config
  row = rows.make("gptq_adaround_int3_g32", c)
  assert "from GPTQ" in row.description and row.needs == {"stats"}
  ada = _kernels(row.compress(ctx))
  g = _kernels(rows.make("gptq_int3_g32", c).compress(ctx))
  assert ada.keys() == g.keys()
  for p, q in ada.items():
    # GPTQ's scales kept; each code GPTQ's or one step from it
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(g[p].scale))
    d = np.abs(np.asarray(q.code_values()) - np.asarray(g[p].code_values()))
    assert d.max() <= 1, p


def test_rows_the_tiny_run_leaves_out_are_default_rows():
  """smoke.TESTED_APART names default rows (at tiny group sizes), so the
  tiny run's exclusions cannot go stale."""
  full = re.sub(r"_g(?:64|128)(?=\D|$)", "_g32",
                default_config.get_config().methods).split(",")
  assert set(smoke.TESTED_APART) <= set(full)
  assert not set(smoke.TESTED_APART) & set(
      smoke.tiny_methods(default_config.get_config().methods).split(","))
