"""Candidates and tables: exact bytes, proxies vs numpy, plans as rules."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax import allocate as A
from compressjax.core.errors import CompressionError
from compressjax.core.tree import leaves_with_paths
from tests.allocate.fixtures import mlp

T = cj.transforms
K0, K1, K2 = ("params/layers_0/kernel", "params/layers_2/kernel",
              "params/layers_4/kernel")


def _leaves(tree):
  return dict(leaves_with_paths(tree))


QUANT = [A.candidate(T.quantize, "int2", bits=2),
         A.candidate(T.quantize, "int4_g16", bits=4, group_size=16),
         A.candidate(T.quantize, "int8", bits=8), A.DENSE]


def test_table_bytes_are_those_of_the_full_tree_transform():
  _, v, stats, _ = mlp()
  t = A.build_table(v, QUANT, stats=stats)
  assert t.paths == (K0, K1, K2)
  full = {"int2": T.quantize(2).apply(v),
          "int4_g16": T.quantize(4, group_size=16).apply(v),
          "int8": T.quantize(8).apply(v), "dense": v}
  for layer in t.layers:
    for c, b in zip(layer.candidates, layer.nbytes):
      leaf = _leaves(full[c.label])[layer.path]
      assert b == leaf.nbytes if c.label != "dense" else b == leaf.nbytes
  dense = t.layers[0].index("dense")
  assert t.layers[0].nbytes[dense] == 32 * 32 * 4
  assert t.layers[0].scores["output"][dense] == 0.0
  assert t.dense_bytes == 4 * (32 * 32 + 32 * 32 + 32 * 16)


def test_output_proxy_is_the_output_error_on_calibration_inputs():
  _, v, stats, batches = mlp()
  t = A.build_table(v, QUANT, stats=stats, hessian_trace={
      K0: 3.0, K1: 2.0, K2: 1.0}, fisher={
          p: jnp.full(x.shape, 0.25) for p, x in _leaves(v).items()
          if p in (K0, K1, K2)})
  x = np.concatenate([np.asarray(b[0], np.float64) for b in batches])
  w = np.asarray(_leaves(v)[K0], np.float64)
  layer = t.layers[0]
  for i, c in enumerate(layer.candidates):
    w_hat = np.asarray(cj.materialize_tree(c.compress(K0, _leaves(v)[K0])),
                       np.float64)
    dw = w - w_hat
    ref = float(np.sum((x @ dw) ** 2))
    assert layer.scores["output"][i] == pytest.approx(ref, rel=2e-4, abs=1e-6)
    sq = float(np.sum(dw ** 2))
    assert layer.scores["weight"][i] == pytest.approx(sq, rel=1e-5, abs=1e-9)
    assert layer.scores["hawq"][i] == pytest.approx(
        0.5 * 3.0 / w.size * sq, rel=1e-5, abs=1e-12)
    assert layer.scores["fisher"][i] == pytest.approx(0.5 * 0.25 * sq,
                                                      rel=1e-5, abs=1e-12)
  # more bits, less error, in every proxy
  for layer in t.layers:
    s = layer.scores["output"]
    i2, i4, i8 = (layer.index(k) for k in ("int2", "int4_g16", "int8"))
    assert s[i2] > s[i4] > s[i8] > 0


def test_plan_rules_reproduce_the_planned_bytes_exactly():
  _, v, stats, _ = mlp()
  t = A.build_table(v, QUANT, stats=stats)
  plan = A.solve(t, bits_per_weight=4.5, proxy="output")
  assert plan.planned_bytes <= plan.budget
  a = plan.apply(v)
  assert plan.realized_bytes(a) == plan.planned_bytes
  # the rules are ordinary rules: the same tree from T.quantize directly,
  # whose default filter would otherwise quantize everything not in the plan
  b = T.quantize(rules=plan.rules).apply(v)
  for (p, x), (q, y) in zip(leaves_with_paths(a), leaves_with_paths(b)):
    assert p == q and type(x) is type(y)
    np.testing.assert_array_equal(cj.materialize_tree(x),
                                  cj.materialize_tree(y))
  assert plan.realized_bytes(b) == plan.planned_bytes
  for p, lab in plan.labels.items():
    assert cj.is_compressed(_leaves(a)[p]) == (lab != "dense")


def test_mixtures_low_rank_and_calibrated_candidates():
  _, v, stats, _ = mlp()
  wanda = functools.partial(T.wanda, stats)  # calibrated, default filter
  cands = [
      A.candidate(wanda, "wanda75", sparsity=0.75),
      A.mixture("50%+int4", (T.sparsify, dict(sparsity=0.5)),
                (T.quantize, dict(bits=4))),
      A.candidate(T.low_rank, "rank4", rank=4),
      A.DENSE]
  t = A.build_table(v, cands, stats=stats)
  for labels in ({K0: "wanda75", K1: "50%+int4", K2: "rank4"},
                 {K0: "50%+int4", K1: "rank4", K2: "dense"}):
    plan = A.fixed(t, labels, proxy="output")
    out = plan.apply(v)
    assert plan.realized_bytes(out) == plan.planned_bytes
    kinds = {p: type(x).__name__ for p, x in leaves_with_paths(out)}
    want = {"wanda75": "SparseArray", "50%+int4": "SparseArray",
            "rank4": "LowRank", "dense": "ArrayImpl"}
    for p, lab in labels.items():
      assert kinds[p] == want[lab], (p, lab, kinds[p])
      if lab == "50%+int4":
        assert type(_leaves(out)[p].values).__name__ == "QArray"
  with pytest.raises(CompressionError, match="several transforms"):
    A.fixed(t, {K0: "wanda75", K1: "50%+int4", K2: "rank4"}).rules
  # wanda's rules alone: only K0 is touched, though wanda's default filter
  # would take every kernel
  plan = A.fixed(t, {K0: "wanda75", K1: "dense", K2: "dense"})
  out = T.wanda(stats, rules=plan.rules).apply(v)
  assert [p for p, x in leaves_with_paths(out) if cj.is_compressed(x)] == [K0]


def test_stage_orders_must_agree():
  _, v, _, _ = mlp()
  a = A.mixture("s+q", (T.sparsify, dict(sparsity=0.5)),
                (T.quantize, dict(bits=4)))
  b = A.mixture("q+s", (T.quantize, dict(bits=4)),
                (T.sparsify, dict(sparsity=0.5)))
  t = A.build_table(v, {K0: [a], K1: [a], K2: [A.DENSE]})
  # q+s would quantize first and cannot then sparsify: a clear error
  with pytest.raises(CompressionError, match="does not fit.*sparsify first"):
    A.build_table(v, {K0: [b], K1: [a], K2: [A.DENSE]})
  plan = A.fixed(t, {K0: "s+q", K1: "s+q", K2: "dense"})
  assert [A.candidates.builder_name(x) for x in plan.stages()] == [
      "sparsify", "quantize"]
  c = A.mixture("q", (T.quantize, dict(bits=4)),)
  d = A.mixture("q+s2", (T.quantize, dict(bits=4)),
                (T.sparsify, dict(sparsity=0.5)))
  bad = dataclasses_replace_table(t, {K2: [c, d]})
  with pytest.raises(CompressionError, match="different orders"):
    A.fixed(bad, {K0: "s+q", K1: "s+q", K2: "q+s2"}).stages()


def dataclasses_replace_table(t, extra):
  """A table whose layer K2 offers `extra` candidates (bytes made up)."""
  import dataclasses
  layers = []
  for l in t.layers:
    if l.path in extra:
      n = len(extra[l.path])
      l = dataclasses.replace(l, candidates=tuple(extra[l.path]),
                              nbytes=np.ones(n, np.int64),
                              scores={"weight": np.zeros(n)})
    layers.append(l)
  return A.Table(tuple(layers))


def test_bad_candidates_name_the_layer_and_the_fix():
  _, v, stats, _ = mlp()
  g24 = A.candidate(T.quantize, "int4_g24", bits=4, group_size=24)
  with pytest.raises(CompressionError, match=r"int4_g24.*does not fit.*"
                     r"drop_unfit=True.*layers_0/kernel"):
    A.build_table(v, [g24, A.DENSE])
  t = A.build_table(v, [g24, A.DENSE], drop_unfit=True)
  # 24 divides no in_features (32): dropped everywhere
  assert all([c.label for c in l.candidates] == ["dense"] for l in t.layers)
  with pytest.raises(CompressionError, match="none of the 1 candidates"):
    A.build_table(v, [g24], drop_unfit=True)
  with pytest.raises(CompressionError, match="empty candidate list.*"
                     "layers_0/kernel"):
    A.build_table(v, [])
  with pytest.raises(CompressionError, match="no candidates given.*"
                     "layers_2/kernel"):
    A.build_table(v, {K0: QUANT})
  with pytest.raises(CompressionError, match="labels repeat"):
    A.build_table(v, [QUANT[0], QUANT[0]])
  with pytest.raises(CompressionError, match="no calibration statistics"):
    A.build_table(v, QUANT, stats={})
  with pytest.raises(CompressionError, match="no layer selected"):
    A.build_table(v, QUANT, rules=[(".*", None)])


def test_grids_label_and_configure_candidates():
  sp = A.sparsity_grid(T.sparsify, [0.5, 0.75], pattern="unstructured")
  assert [c.label for c in sp] == ["sparsify 50%", "sparsify 75%"]
  assert dict(sp[1].stages[0].config) == dict(sparsity=0.75,
                                               pattern="unstructured")
  lr = A.rank_grid(T.low_rank, [0.25])
  assert lr[0].label == "low_rank r0.25"
  assert dict(lr[0].stages[0].config) == dict(rank_ratio=0.25)
  assert A.candidate(T.quantize, bits=3).label == "quantize(bits=3)"
