"""Transforms: rules, overrides, reports, and composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core.rules import Rule, default_filter, resolve
from compressjax.core.transform import LeafState, leaf_transform

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


def test_chain_init_on_shapes_only():
  """`init` on jax.eval_shape output: traceable parts are traced to give the
  next part its input; a part that reads values fails naming the fix."""
  p = _params()
  shapes = jax.eval_shape(lambda: p)
  parts = [T.sparsify(pattern="nm", n=2, m=4), T.quantize(4, group_size=8)]
  abstract = cj.chain(*parts).init(shapes)
  concrete = cj.chain(*parts).init(p)
  assert abstract[1].plan.configs == concrete[1].plan.configs
  out, _ = cj.chain(*parts).update(p, abstract)
  np.testing.assert_array_equal(
      cj.core.materialize(out["params"]["head"]["kernel"]),
      cj.core.materialize(cj.chain(*parts).apply(p)["params"]["head"]["kernel"]))

  def reads_values(path, leaf, cfg, state):
    if bool(jnp.all(leaf == 0)):  # a data-dependent branch
      return leaf
    return leaf * 2
  valued = leaf_transform("reads_values", {}, reads_values)
  with pytest.raises(cj.CompressionError, match="part 0 reads values"):
    cj.chain(valued, parts[1]).init(shapes)


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


# -- chain: exact, also when an init reads values ----------------------------

def _np_params():
  k = lambda i, s: np.random.default_rng(i).standard_normal(s, np.float32)
  return {"a": {"kernel": k(0, (16, 16))}, "b": {"kernel": k(1, (16, 16))}}


def _is_sparse(path, leaf):
  return isinstance(leaf, cj.SparseArray)


def _large(path, leaf):  # reads values: max |w| of the (dense) leaf
  return float(jnp.max(jnp.abs(cj.core.materialize(leaf)))) > 2.0


VALUE_DEPENDENT = {
    # global threshold computed in init (the example)
    "lowrank_residual_then_global": lambda: (
        T.low_rank(4, residual=True), T.sparsify(0.5, scope="global")),
    # a rule predicate that reads the leaf's type
    "sparsify_then_typed_rule": lambda: (
        T.sparsify(0.5), T.quantize(8, rules=[Rule(_is_sparse, dict(bits=4))],
                                    default=None)),
    # a rule predicate that reads the leaf's values
    "lowrank_then_value_rule": lambda: (
        T.low_rank(2), T.quantize(8, rules=[Rule(_large, dict(bits=3))],
                                  default=None)),
}


def _assert_same(x, y):
  is_leaf = cj.is_compressed
  assert jax.tree.structure(x, is_leaf=is_leaf) == jax.tree.structure(
      y, is_leaf=is_leaf)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(VALUE_DEPENDENT))
def test_chain_is_exact_when_init_reads_values(name):
  p = _np_params()
  a, b = VALUE_DEPENDENT[name]()
  mid = a.apply(p)
  seq = b.apply(mid)
  c = cj.chain(a, b)
  _assert_same(c.apply(p), seq)
  out, state = c.update(p, c.init(p))
  _assert_same(out, seq)
  # b was initialized on a's output, not on p
  ref = b.init(mid)
  assert dict(state[1].plan.configs) == dict(ref.plan.configs)
  if name == "lowrank_residual_then_global":
    kept = lambda t: sum(l.residual.num_kept for _, l in
                         cj.core.leaves_with_paths(t))
    total = sum(l.size for l in jax.tree.leaves(p))
    assert kept(seq) == kept(c.apply(p)) == total - round(0.5 * total)
    assert float(state[1].extra["threshold"]) == float(
        ref.extra["threshold"])
  if name == "sparsify_then_typed_rule":
    assert {x.values.fmt.bits for x in jax.tree.leaves(
        out, is_leaf=cj.is_compressed)} == {4}


def test_chain_nested_and_runs_each_part_once_in_apply():
  calls = []

  def counted(t, tag):
    def update(params, state):
      calls.append(tag)
      return t.update(params, state)
    return cj.Transform(t.init, update)

  p = _np_params()
  a = counted(T.low_rank(4, residual=True), "a")
  b = counted(T.sparsify(0.5, scope="global"), "b")
  q = counted(T.quantize(8), "q")
  nested = cj.chain(cj.chain(a, b), q)
  flat_seq = q.apply(b.apply(a.apply(p)))
  calls.clear()
  _assert_same(nested.apply(p), flat_seq)
  assert calls == ["a", "b", "q"]
  calls.clear()
  nested.update(p, nested.init(p))
  assert calls.count("q") == 1  # the last part is never run by init


def test_chain_fails_loudly_on_misuse():
  p = _np_params()
  c = cj.chain(T.sparsify(0.5), T.quantize(8))
  s = c.init(p)
  with pytest.raises(cj.CompressionError, match=r"chain of 2 transforms got "
                     r"a state of length 1"):
    c.update(p, s[:1])
  with pytest.raises(cj.CompressionError, match="length 3"):
    c.update(p, s + s[:1])
  with pytest.raises(cj.CompressionError, match="got a LeafState"):
    c.update(p, s[0])
  with pytest.raises(cj.CompressionError, match=r"argument 1 is a function, "
                     r"not a Transform; call it"):
    cj.chain(T.sparsify(0.5), T.quantize)
  with pytest.raises(cj.CompressionError, match="needs the state its init "
                     "returned"):
    T.quantize(8).update(p, s)  # a chain's state given to one part


# -- partition / combine -----------------------------------------------------

def test_combine_round_trip_and_mismatched_trees():
  p = {"a": {"kernel": np.ones((8, 8), np.float32)}, "n": np.int32(3),
       "z": None}
  c = cj.quantize(p, 4, default=lambda path, x: path == "a/kernel")
  flo, rest = cj.partition_float(c)
  _assert_same(cj.combine(flo, rest), c)
  other = cj.quantize({"a": {"kernel": np.ones((8, 8), np.float32)},
                       "m": np.int32(3), "z": None}, 4,
                      default=lambda path, x: path == "a/kernel")
  with pytest.raises(cj.TreeMismatchError, match=r"'n' is in the first "
                     r"tree only; pass the two halves"):
    cj.combine(flo, cj.partition_float(other)[1])
  q3 = cj.quantize(p, 3, default=lambda path, x: path == "a/kernel")
  with pytest.raises(cj.TreeMismatchError, match=r"'a/kernel' has other "
                     r"static metadata"):
    cj.combine(flo, cj.partition_float(q3)[1])
  with pytest.raises(cj.TreeMismatchError, match="both trees hold a value"):
    cj.combine(flo, flo)
