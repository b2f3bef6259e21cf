"""Bad input raises a CompressionError that names the param path and the fix."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import compressjax as cj

PATH = "decoder/layer_3/mlp/kernel"


def _tree(w=None):
  w = jax.random.normal(jax.random.key(0), (1000, 64)) if w is None else w
  return {"decoder": {"layer_3": {"mlp": {"kernel": w}}}}


@pytest.mark.parametrize("call,match", [
    (lambda: cj.quantize(_tree(), 4, group_size=96),
     r"group_size 96 does not divide in_features 1000"),
    (lambda: cj.quantize(_tree(), 9), r"bits must be in \[2, 8\], got 9"),
    (lambda: cj.quantize(_tree(), 1), r"bits must be in \[2, 8\], got 1"),
    (lambda: cj.sparsify(_tree(), pattern="nm", n=4, m=4),
     r"N:M sparsity needs 0 < N < M, got 4:4"),
    (lambda: cj.sparsify(_tree(), pattern="nm", n=2, m=3),
     r"M=3 does not divide in_features 1000"),
    (lambda: cj.low_rank(_tree(), 65), r"rank 65 is outside \[1, min\(m, n\) = 64\]"),
    (lambda: cj.sparsify(_tree(), 0.5, pattern="block", block=(3, 8)),
     r"block \(3, 8\) does not tile"),
])
def test_bad_configs_name_the_path(call, match):
  with pytest.raises(cj.CompressionError, match=match) as e:
    call()
  assert f"'{PATH}'" in str(e.value) and e.value.path == PATH


@pytest.mark.parametrize("call,match", [
    (lambda: cj.sparsify(_tree(), 1.0),
     r"sparsify: option sparsity=1.0 must be in \[0, 1\)"),
    (lambda: cj.sparsify(_tree(), -0.1),
     r"sparsify: option sparsity=-0.1 must be in \[0, 1\)"),
    (lambda: cj.low_rank(_tree(), 4.5),
     r"low_rank: option rank=4.5 must be int or None, got float"),
    (lambda: cj.sparsify(_tree(), pattern="nm", n=2.0, m=4),
     r"sparsify: option n=2.0 must be int or None, got float"),
    (lambda: cj.sparsify(_tree(), pattern="nm", n=2, m=4.0),
     r"sparsify: option m=4.0 must be int or None, got float"),
    (lambda: cj.sparsify(_tree(), pattern="nn", n=2, m=4),
     r"option pattern='nn' must be one of .*; did you mean 'nm'\?"),
])
def test_leaf_independent_values_fail_when_the_transform_is_built(call,
                                                                   match):
  with pytest.raises(cj.CompressionError, match=match) as e:
    call()
  assert e.value.path is None  # no param was looked at yet


def test_non_float_leaf_asked_for_explicitly():
  t = _tree(jnp.ones((8, 8), jnp.int32))
  assert not cj.is_compressed(cj.quantize(t, 8)["decoder"]["layer_3"]["mlp"][
      "kernel"])  # the default rules skip it silently
  with pytest.raises(cj.CompressionError, match="non-float leaf of dtype int32"
                     ) as e:
    cj.quantize(t, 8, rules=[(r".*kernel", {})])
  assert e.value.path == PATH


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nan_or_inf_in_weight(bad):
  w = jnp.ones((16, 8)).at[3, 2].set(bad)
  for fn in (lambda t: cj.quantize(t, 8), lambda t: cj.sparsify(t, 0.5),
             lambda t: cj.low_rank(t, 2)):
    with pytest.raises(cj.CompressionError, match="NaN or Inf") as e:
      fn(_tree(w))
    assert e.value.path == PATH


def test_rule_regex_that_does_not_compile():
  with pytest.raises(cj.CompressionError, match=r"rule regex '\(\.\*kernel' "
                     "does not compile"):
    cj.quantize(_tree(), 8, rules=[("(.*kernel", {})])


def test_linen_tree_that_does_not_match_the_model():
  model = nn.Dense(4)
  x = jnp.ones((2, 8))
  v = cj.quantize(model.init(jax.random.key(0), x), 8,
                  default=lambda p, l: l.ndim == 2)
  bad = {"params": {"kernel_renamed": v["params"]["kernel"],
                    "bias": v["params"]["bias"]}}
  with pytest.raises(cj.TreeMismatchError, match="kernel"):
    cj.run(model, bad, x)
  wrong_shape = cj.quantize(nn.Dense(4).init(jax.random.key(0),
                                             jnp.ones((2, 16))), 8)
  with pytest.raises(cj.TreeMismatchError, match="does not match the model"):
    cj.run(model, wrong_shape, x)


def test_nnx_tree_that_does_not_match_the_model():
  model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  other = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  c = cj.quantize(nnx.state(other, nnx.Param), 8)
  with pytest.raises(cj.TreeMismatchError,
                     match=r"shape 'kernel' \(16, 4\) != model's \(8, 4\)"):
    cj.run(model, c, jnp.ones((2, 8)))


def test_sparsify_after_quantize_is_refused():
  q = cj.quantize(_tree(), 8)
  with pytest.raises(cj.CompressionError, match="sparsify first") as e:
    cj.sparsify(q, 0.5)
  assert e.value.path == PATH
