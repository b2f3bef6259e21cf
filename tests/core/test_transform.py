"""Transforms: rules, overrides, reports, and composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.rules import Rule, default_filter, resolve
from compressjax.core.transform import LeafState

T = cj.transforms


def _params():
  k = lambda i, s: jax.random.normal(jax.random.key(i), s)
  return {"params": {
      "embed": {"embedding": k(0, (50, 32))},
      "layer_0": {"mlp": {"kernel": k(1, (32, 64)), "bias": jnp.zeros(64)},
                  "norm": {"scale": jnp.ones(32)}},
      "layer_1": {"mlp": {"kernel": k(2, (64, 32)), "bias": jnp.zeros(32)}},
      "head": {"kernel": k(3, (32, 50))},
      "step": jnp.array(3, jnp.int32)}}


def test_default_selects_float_kernels_only():
  plan = resolve(_params(), {}, None)
  assert set(plan.configs) == {"params/layer_0/mlp/kernel",
                               "params/layer_1/mlp/kernel",
                               "params/head/kernel"}


def test_rules_first_match_wins_with_overrides_and_skip():
  rules = [("params/head/kernel", dict(bits=8)),
           Rule(r"params/layer_1/.*", skip=True),
           (r".*kernel", dict(bits=2)),
           (r"params/embed/embedding", dict(bits=8)),  # asked: embeddings too
           (r"nothing/matches/this", dict(bits=3))]
  t = T.quantize(4, rules=rules)
  state = t.init(_params())
  cfg = state.plan.configs
  assert cfg["params/head/kernel"]["bits"] == 8
  assert "params/layer_1/mlp/kernel" not in cfg
  assert cfg["params/layer_0/mlp/kernel"]["bits"] == 2
  assert cfg["params/embed/embedding"]["bits"] == 8
  assert state.unmatched_rules == ("nothing/matches/this",)
  out, _ = t.update(_params(), state)
  assert out["params"]["head"]["kernel"].fmt.bits == 8
  assert not cj.is_compressed(out["params"]["layer_1"]["mlp"]["kernel"])


def test_predicate_rule():
  big = lambda path, leaf: leaf.ndim == 2 and leaf.shape[0] >= 64
  c = cj.quantize(_params(), 4, rules=[Rule(big, dict(bits=8))])
  assert c["params"]["layer_1"]["mlp"]["kernel"].fmt.bits == 8
  assert c["params"]["layer_0"]["mlp"]["kernel"].fmt.bits == 4


def test_chain_equals_parts_in_turn():
  p = _params()
  parts = [T.sparsify(pattern="nm", n=2, m=4), T.quantize(4, group_size=8)]
  chained = cj.chain(*parts).apply(p)
  seq = parts[1].apply(parts[0].apply(p))
  la, lb = jax.tree.leaves(chained), jax.tree.leaves(seq)
  assert jax.tree.structure(chained) == jax.tree.structure(seq)
  for a, b in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  state = cj.chain(*parts).init(p)
  assert len(state) == 2 and all(isinstance(s, LeafState) for s in state)


def test_transforms_are_pure_and_deterministic():
  p = _params()
  before = jax.tree.map(np.asarray, p)
  a = cj.quantize(p, 4, group_size=16)
  b = cj.quantize(p, 4, group_size=16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(p)):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_report_figures():
  p = _params()
  c = cj.chain(T.sparsify(0.5), T.quantize(8)).apply(p)
  rows = {r.path: r for r in cj.layer_report(p, c)}
  r = rows["params/layer_0/mlp/kernel"]
  assert r.sparsity == 0.5 and 0 < r.rel_error < 0.8
  # 1024 int8 values, 1 scale, 1 bit per element of the mask
  assert r.bytes == 1024 + 4 + 2048 // 8
  assert r.bits_per_weight == pytest.approx(8 * r.bytes / 2048)
  lr = {r.path: r for r in cj.layer_report(p, cj.low_rank(p, 4))}
  assert lr["params/head/kernel"].rank == 4
  text = cj.summary(p, c)
  assert "params/layer_0/mlp/kernel" in text and "TOTAL" in text
  assert cj.tree_nbytes(c) < cj.tree_nbytes(p)
  assert cj.compression_ratio(p, c) == pytest.approx(
      cj.tree_nbytes(p) / cj.tree_nbytes(c))
