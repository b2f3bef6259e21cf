"""What belongs to a leaf type lives on it: descriptions, sparsity, which
compressions may follow it; summary refuses trees of another structure;
leaves of another layout version fail clearly; PactInput restores anywhere."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.core import checkpoint
from compressjax.core.base import Stage, inner_arrays
from compressjax.core.input_transform import InputTransform
from compressjax.core.pact_input import PactInput, pact_forward
from compressjax.quantization import quantize_array

T = cj.transforms
W = jax.random.normal(jax.random.key(0), (16, 8))


@functools.lru_cache(maxsize=None)
def _leaves():
  q4 = quantize_array(W, 4, group_size=8)
  return {
      "q": q4,
      "cb": quantize_array(W, format="codebook3"),
      "nm": T.quantize(4, group_size=4).apply(
          {"k": cj.sparsify({"k": W}, pattern="nm", n=2, m=4)["k"]})["k"],
      "sp": cj.sparsify({"k": W}, 0.5)["k"],
      "lr": T.quantize(4).apply({"k": cj.low_rank(
          {"k": W}, 4, residual=True)["k"]})["k"],
      "it": InputTransform(weight=quantize_array(W, 8), scale=None,
                           signs=None, block=0, act="int8", shape=(16, 8),
                           dtype="float32"),
      "pact": PactInput(weight=q4, alpha=jnp.float32(2.0), bits=4,
                        signed=True, shape=(16, 8), dtype="float32"),
  }


def test_descriptions_and_sparsity_come_from_the_types():
  got = {k: (v.describe(), round(v.sparsity, 3)) for k, v in _leaves().items()}
  assert got == {
      "q": ("int4 g8", 0.0), "cb": ("codebook3 x1", 0.0),
      "nm": ("2:4(int4 g4)", 0.5), "sp": ("unstructured 50%", 0.5),
      "lr": ("rank 4 + int4 c", 0.0), "it": ("int8 c [a:int8]", 0.0),
      "pact": ("int4 g8 [pact4]", 0.0)}
  rows = {r.path: r for r in cj.layer_report(
      {k: W for k in got}, _leaves(), errors=False)}
  assert rows["nm"].format == "2:4(int4 g4)" and rows["nm"].sparsity == 0.5
  assert rows["lr"].rank == 4 and rows["q"].rank is None


@pytest.mark.parametrize("name,op,match", [
    ("q", Stage.QUANTIZE, "already quantized"),
    ("cb", Stage.QUANTIZE, "already quantized"),
    ("q", Stage.SPARSIFY, "sparsify first, then quantize"),
    ("cb", Stage.FACTORIZE, "cannot factorize a CodebookArray"),
    ("sp", Stage.SPARSIFY, "already sparse"),
    ("nm", Stage.FACTORIZE, "cannot factorize"),
    ("lr", Stage.FACTORIZE, "already factorized"),
    ("it", Stage.SPARSIFY, "sparsify first"),  # its weight is quantized
    ("pact", Stage.QUANTIZE, "already quantized"),
])
def test_which_compressions_may_follow(name, op, match):
  with pytest.raises(cj.CompressionError, match=match) as e:
    list(inner_arrays(_leaves()[name], op, "a/kernel"))
  assert e.value.path.startswith("a/kernel")


def test_low_rank_without_residual_quantizes_factors_but_cannot_sparsify():
  lr = cj.low_rank({"k": W}, 4)["k"]
  assert [p for p, _, _ in inner_arrays(lr, Stage.QUANTIZE, "k")] == [
      "k/a", "k/b"]
  with pytest.raises(cj.CompressionError, match="no residual to sparsify"):
    cj.sparsify({"k": lr}, 0.5, default=lambda p, x: True)


def test_every_algorithm_follows_the_type_not_its_own_list():
  # low_rank used to accept a CodebookArray and choke on an InputTransform
  with pytest.raises(cj.CompressionError, match="cannot factorize a Codebook"):
    cj.low_rank({"k": _leaves()["cb"]}, 4, default=lambda p, x: True)
  it = InputTransform(weight=W, scale=jnp.linspace(0.5, 2, 16), signs=None,
                      block=0, act=None, shape=(16, 8), dtype="float32")
  out = cj.low_rank({"k": it}, 4, default=lambda p, x: True)["k"]
  assert isinstance(out, InputTransform) and isinstance(out.weight, cj.LowRank)
  x = jax.random.normal(jax.random.key(1), (3, 16))
  np.testing.assert_allclose(cj.apply(lambda t, x: x @ t, out, x),
                             x @ out.materialize(), rtol=1e-4, atol=1e-4)


def test_summary_refuses_another_structure():
  c = cj.quantize({"a": {"kernel": W}}, 8)
  for other in ({"b": {"kernel": W}}, {"a": {"kernel": W.T}},
                {"a": {"kernel": W}, "c": {"kernel": W}}):
    with pytest.raises(cj.TreeMismatchError, match="summary") as e:
      cj.summary(other, c)
    assert e.value.path in ("a/kernel", "c/kernel")
  assert "int8 c" in cj.summary({"a": {"kernel": W}}, c)


def test_leaf_of_another_layout_version_fails_clearly():
  q = quantize_array(W, 4)
  old = dict(codes=q.codes, scale=q.scale, zero=None, shape=q.shape,
             dtype=q.dtype, fmt=q.fmt, axis=0)  # the pre-contraction layout
  with pytest.raises(cj.CompressionError, match="another layout version"):
    cj.QArray(**old)


def test_checkpoint_of_an_older_format_version_fails_clearly(tmp_path):
  cj.save(tmp_path / "c", {"k": quantize_array(W, 4)})
  meta = tmp_path / "c" / checkpoint.MANIFEST
  manifest = json.loads(meta.read_text())
  spec = manifest["spec"]

  def age(x):
    if isinstance(x, dict):
      if "version" in x and "kind" in x:
        x["version"] = 1
      for v in x.values():
        age(v)
    elif isinstance(x, list):
      for v in x:
        age(v)
  age(spec)
  manifest["spec_sha256"] = checkpoint._spec_digest(spec)  # an honest old one
  meta.write_text(json.dumps(manifest))
  with pytest.raises(cj.CompressionError, match="layout version 1"):
    cj.restore(tmp_path / "c")


def test_pact_forward_definition():
  x = jnp.linspace(-3, 3, 61)
  a = jnp.float32(2.0)
  got = np.asarray(pact_forward(x, a, 3, False))
  d = 2.0 / 7
  np.testing.assert_allclose(got, np.round(np.clip(np.asarray(x), 0, 2) / d)
                             * d, rtol=1e-6)


def test_exported_pact_tree_restores_in_a_fresh_process(tmp_path):
  tree = {"k": _leaves()["pact"]}
  cj.save(tmp_path / "p", tree)
  code = ("import compressjax as cj, numpy as np, sys; "
          "t = cj.restore(sys.argv[1])['k']; "
          "print(type(t).__name__, t.bits, t.signed, float(t.alpha))")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get(
                 "PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["PactInput", "4", "True", "2.0"]
  r = cj.restore(tmp_path / "p")["k"]
  x = jax.random.normal(jax.random.key(2), (3, 16)) * 2
  want = pact_forward(x, 2.0, 4, True) @ r.weight.materialize()
  np.testing.assert_allclose(cj.apply(lambda t, x: x @ t, r, x), want,
                             rtol=1e-5, atol=1e-5)
