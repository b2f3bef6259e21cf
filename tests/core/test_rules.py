"""Typed options and rules: one declaration per transform, checked when the
transform is built; dict rules; `default=None` means rules only."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.core.rules import Options, Rule, default_filter, resolve
from compressjax.lowrank.asvd import AsvdOptions, asvd
from compressjax.lowrank.svd import LowRankOptions
from compressjax.lowrank.svd_llm import svd_llm
from compressjax.quantization.awq import awq
from compressjax.quantization.gptq import GptqOptions, gptq, gptq_quantize
from compressjax.quantization.rotation import rotate, rotation_gptq
from compressjax.quantization.rtn import QuantizeOptions
from compressjax.quantization.smoothquant import smoothquant
from compressjax.sparsity.magnitude import SparsifyOptions
from compressjax.sparsity.sparsegpt import sparsegpt, sparsegpt_prune
from compressjax.sparsity.wanda import wanda
from compressjax.train.qat import qat

T = cj.transforms
KEY = jax.random.key(0)


def _params():
  k = lambda i, s: np.random.default_rng(i).standard_normal(s, np.float32)
  return {"params": {"embed": {"embedding": k(0, (50, 16))},
                     "mlp": {"kernel": k(1, (16, 32)), "bias": np.zeros(32)},
                     "head": {"kernel": k(2, (32, 8))}}}


# Every builder, as (name, build(**kw)); calibrated ones get no stats: their
# options and rules are checked before any stats or param is read.
BUILDERS = {
    "quantize": lambda **kw: T.quantize(4, **kw),
    "sparsify": lambda **kw: T.sparsify(0.5, **kw),
    "low_rank": lambda **kw: T.low_rank(4, **kw),
    "gptq": lambda **kw: gptq({}, 4, **kw),
    "awq": lambda **kw: awq({}, 4, **kw),
    "smoothquant": lambda **kw: smoothquant({}, 0.5, **kw),
    "wanda": lambda **kw: wanda({}, 0.5, **kw),
    "sparsegpt": lambda **kw: sparsegpt({}, 0.5, **kw),
    "asvd": lambda **kw: asvd({}, rank=4, **kw),
    "svd_llm": lambda **kw: svd_llm({}, rank=4, **kw),
    "qat": lambda **kw: qat(4, **kw),
    "rotate": lambda **kw: rotate(KEY, **kw),
}
# an option of each and a value of the wrong type for it
TYPO = {"quantize": "group_sise", "sparsify": "sparsty", "low_rank": "rnk",
        "gptq": "dampp", "awq": "n_grd", "smoothquant": "alfa",
        "wanda": "sparsty", "sparsegpt": "block_sise", "asvd": "alpah",
        "svd_llm": "energi", "qat": "act_bitz", "rotate": "blok"}


def test_the_verbatim_rule_error():
  with pytest.raises(cj.CompressionError) as e:
    T.sparsify(rules=[(r".*mlp.*", dict(sparsty=0.9))])
  assert str(e.value) == (
      "sparsify: rule '.*mlp.*': unknown option 'sparsty'; did you mean "
      "'sparsity'? (options: sparsity, pattern, n, m, axis, block, "
      "channel_axis, scope)")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_misspelt_option_fails_at_build_with_nearest_name(name):
  build, typo = BUILDERS[name], TYPO[name]
  build()  # builds fine without the typo
  with pytest.raises(cj.CompressionError, match=(
      rf"{name}: rule '\.\*kernel': unknown option '{typo}'; did you mean "
      r"'\w+'\?")):
    build(rules=[(r".*kernel", {typo: 1})])
  with pytest.raises(cj.CompressionError, match=(
      rf"{name}: unknown argument '{typo}'; did you mean '\w+'\?")):
    build(**{typo: 1})
  # the same rules as a dict: checked (and refused) just the same
  with pytest.raises(cj.CompressionError, match=f"unknown option '{typo}'"):
    build(rules={r".*kernel": {typo: 1}})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_wrong_type_in_a_rule_names_the_rule_and_option(name):
  first = {"quantize": "bits", "sparsify": "sparsity", "low_rank": "rank",
           "gptq": "damp", "awq": "n_grid", "smoothquant": "alpha",
           "wanda": "m", "sparsegpt": "block_size", "asvd": "alpha",
           "svd_llm": "rank", "qat": "act_bits", "rotate": "block"}[name]
  with pytest.raises(cj.CompressionError, match=(
      rf"{name}: rule 'params/head/kernel': option {first}='x' must be")):
    BUILDERS[name](rules=[("params/head/kernel", {first: "x"})])


def test_values_checked_at_build():
  cases = [
      (lambda: gptq({}, 4, damp=-0.01), r"gptq: option damp=-0.01 must be "
       r"a finite number >= 0"),
      (lambda: sparsegpt({}, 0.5, damp=-1.0), r"option damp=-1.0 must be"),
      (lambda: T.low_rank(4.5), r"option rank=4.5 must be int or None"),
      (lambda: asvd({}, rank=4.5), r"option rank=4.5 must be int or None"),
      (lambda: T.sparsify(pattern="nm", n=2.0, m=4), r"option n=2.0 must be"),
      (lambda: wanda({}, pattern="nm", n=2, m=4.0), r"option m=4.0 must be"),
      (lambda: T.quantize(True), r"option bits=True must be int or None, got bool"),
      (lambda: T.quantize(4, scale_dtype=jnp.int8), r"must be a float dtype"),
      (lambda: qat(4, weight="lqs"), r"did you mean 'lsq'\?"),
      (lambda: smoothquant({}, act="int4"), r"option act='int4' must be one "
       r"of None, 'int8'"),
      (lambda: T.quantize(4, rules=[("a", dict(bits=9.0))]),
       r"quantize: rule 'a': option bits=9.0 must be int or None, got float"),
  ]
  for call, match in cases:
    with pytest.raises(cj.CompressionError, match=match):
      call()
  # array-level entry points check the same options
  w, h = jnp.ones((8, 4)), jnp.eye(8)
  with pytest.raises(cj.CompressionError, match="damp=-0.5 must be"):
    gptq_quantize(w, h, damp=-0.5)
  with pytest.raises(cj.CompressionError, match="damp=-0.5 must be"):
    sparsegpt_prune(w, h, damp=-0.5)


def test_one_declaration_gives_defaults_signature_and_docs():
  sig = inspect.signature(T.quantize)
  for f in dataclasses.fields(QuantizeOptions):
    assert sig.parameters[f.name].default is f.default or (
        sig.parameters[f.name].default == f.default)
    assert f"  {f.name} (" in T.quantize.__doc__
    assert f.name in QuantizeOptions.__doc__
  assert list(sig.parameters)[0] == "bits"
  assert sig.parameters["bits"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
  assert sig.parameters["rules"].kind is inspect.Parameter.KEYWORD_ONLY
  assert list(inspect.signature(gptq).parameters)[:2] == ["stats", "bits"]
  assert T.quantize.options is QuantizeOptions
  # the base config of the built transform is an instance of the options
  plan = T.quantize(3, group_size=4).init(_params()).plan
  cfg = plan.configs["params/mlp/kernel"]
  assert isinstance(cfg, QuantizeOptions) and cfg == QuantizeOptions(
      bits=3, group_size=4)
  assert cfg["bits"] == 3 and dict(cfg)["group_size"] == 4
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.bits = 8
  # subclassed options keep the parent's fields
  assert set(LowRankOptions.names()) < set(AsvdOptions.names())


def test_options_normalize_and_accept_numpy_numbers():
  o = SparsifyOptions(pattern="block", block=[4, 4], sparsity=np.float32(.5))
  assert o.block == (4, 4) and hash(o) == hash(SparsifyOptions(
      pattern="block", block=(4, 4), sparsity=np.float32(.5)))
  assert QuantizeOptions(bits=np.int64(4)).bits == 4
  with pytest.raises(cj.CompressionError, match="block=.* must hold sizes"):
    SparsifyOptions(block=(0, 4))


def test_dict_rules_equal_list_rules_and_typed_rule_configs():
  p = _params()
  as_list = T.quantize(4, rules=[("params/head/kernel", dict(bits=8)),
                                 ("params/mlp/kernel", None)]).apply(p)
  as_dict = T.quantize(4, rules={"params/head/kernel": dict(bits=8),
                                 "params/mlp/kernel": None}).apply(p)
  typed = T.quantize(4, rules=[Rule("params/head/kernel",
                                    QuantizeOptions(bits=8)),
                               Rule("params/mlp/kernel", skip=True)]).apply(p)
  for out in (as_list, as_dict, typed):
    assert out["params"]["head"]["kernel"].fmt.bits == 8
    assert not cj.is_compressed(out["params"]["mlp"]["kernel"])
  for a, b in zip(jax.tree.leaves(as_list), jax.tree.leaves(as_dict)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(cj.CompressionError, match="config is a GptqOptions, "
                     "not QuantizeOptions"):
    T.quantize(4, rules=[Rule(".*", GptqOptions())])


@pytest.mark.parametrize("rules,match", [
    (("params/head/kernel", dict(bits=8)), "got the single rule"),
    ("params/head/kernel", "got the single rule"),
    (Rule("params/head/kernel"), "got the single rule"),
    (42, "got int"),
    ([("a", 3)], "config must be a dict of options"),
    ([("a", dict(bits=8), 1)], "cannot read"),
])
def test_malformed_rules_are_refused_clearly(rules, match):
  with pytest.raises(cj.CompressionError, match=match):
    T.quantize(4, rules=rules)


CALIBRATED = ("gptq", "awq", "smoothquant", "wanda", "sparsegpt", "asvd",
              "svd_llm")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_default_none_means_rules_only(name):
  p = _params()
  # no rules: nothing selected (the calibrated ones need no stats then)
  t = BUILDERS[name](default=None)
  assert not t.init(p).plan.configs
  assert jax.tree.structure(t.apply(p)) == jax.tree.structure(p)
  if name not in CALIBRATED:  # a rule selects exactly its param
    state = BUILDERS[name](rules=[("params/head/kernel", {})],
                           default=None).init(p)
    assert set(state.plan.configs) == {"params/head/kernel"}


def test_default_is_default_filter_everywhere():
  for f in (T.quantize, T.sparsify, T.low_rank, gptq, awq, smoothquant, wanda,
            sparsegpt, asvd, svd_llm, qat, rotate, capture, rotation_gptq):
    assert inspect.signature(f).parameters["default"].default is (
        default_filter), f.__name__
  # kernels, not embeddings or biases
  assert set(resolve(_params(), {}, None).configs) == {"params/mlp/kernel",
                                                       "params/head/kernel"}


def test_capture_default_none_and_rotation_gptq_check_at_build():
  p = {"w": jnp.ones((8, 4))}
  fn = lambda t, x: x @ t["w"]
  x = jnp.ones((2, 8))
  with pytest.raises(cj.CompressionError, match="capture selected no param"):
    capture(fn, p, [x], default=None)
  assert set(capture(fn, p, [x], rules=[("w", dict(bits=8))],
                     default=None)) == {"w"}  # rule options are not read
  with pytest.raises(cj.CompressionError, match="did you mean 'damp'"):
    rotation_gptq(rotate(KEY), fn, [x], 4, dmp=0.1)
  with pytest.raises(cj.CompressionError, match="default must be a predicate"):
    T.quantize(4, default="kernel")


def test_unmatched_rules_are_reported():
  t = T.sparsify(0.5, rules={"nothing/here": dict(sparsity=0.9),
                             "params/head/kernel": None})
  assert t.init(_params()).unmatched_rules == ("nothing/here",)


def test_options_subclass_must_be_declared_with_the_decorator():
  with pytest.raises(TypeError):
    cj.core.rules.options(type("NotOptions", (), {}))
  assert issubclass(QuantizeOptions, Options)
