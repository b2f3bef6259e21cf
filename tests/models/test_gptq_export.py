"""GPTQ export: files read back and unpacked by an independent numpy reader of
the published layout (AutoGPTQ / vLLM), reconstructed W = (q - z) * s and
compared with the QArray's materialize()."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from compressjax.core.errors import CompressionError
from compressjax.core.lowrank import LowRank
from compressjax.core.qarray import QArray
from compressjax.core.sparse import SparseArray
from compressjax.core.tree import map_with_paths
from compressjax.core.contraction import MatrixLayout
from compressjax.formats.integer import IntFormat
from compressjax.formats.levels import NF4
from compressjax.models import hub
from compressjax.quantization.rtn import quantize_array
from pallas_kernels import layout
from tests.models import hf_fixtures as fx

UP, DOWN, PROJ = ("params/block_0/up/kernel", "params/block_0/down/kernel",
                  "params/proj/kernel")
HF = {UP: "model.layers.0.up", DOWN: "model.layers.0.down",
      PROJ: "model.proj", "params/lm_head/kernel": "lm_head"}


# -- an independent reader of the published layout -----------------------------


def unpack_words(words, bits: int, count: int, axis: int) -> np.ndarray:
  """Codes packed LSB first into consecutive int32 words along `axis`: code i
  is bits [i*b, i*b + b) of the word stream (AutoGPTQ's pack; for 3 bits
  codes 10 and 21 of each 3 words straddle two words)."""
  w = np.moveaxis(np.asarray(words), axis, -1).astype(np.int64) & 0xFFFFFFFF
  out = np.zeros(w.shape[:-1] + (count,), np.int64)
  for i in range(count):
    word, off = divmod(i * bits, 32)
    v = w[..., word] >> off
    if off + bits > 32:
      v = v | (w[..., word + 1] << (32 - off))
    out[..., i] = v & ((1 << bits) - 1)
  return np.moveaxis(out, -1, axis)


def read_gptq(path, module: str, fmt: str):
  """(W (in, out) float32, tensors) as a GPTQ loader dequantizes them."""
  files = list(path.glob("*.safetensors"))
  t = {}
  for f in files:
    with safe_open(str(f), "numpy") as h:
      t.update({k: h.get_tensor(k) for k in h.keys()
                if k.startswith(module + ".")})
  cfg = json.loads((path / "quantize_config.json").read_text())
  bits = cfg["bits"]
  qweight, qzeros = t[module + ".qweight"], t[module + ".qzeros"]
  scales, g_idx = t[module + ".scales"], t[module + ".g_idx"]
  assert qweight.dtype == qzeros.dtype == g_idx.dtype == np.int32
  assert scales.dtype == np.float16
  k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
  q = unpack_words(qweight, bits, k, axis=0)
  z = unpack_words(qzeros, bits, n, axis=1) + (1 if fmt == "gptq" else 0)
  w = (q - z[g_idx]).astype(np.float32) * scales[g_idx].astype(np.float32)
  return w, t, cfg


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  cfg = fx.toy_config_dict(tie_word_embeddings=False)
  d = tmp_path_factory.mktemp("toy")
  fx.write_hf_dir(d, fx.toy_state_dict(cfg, seed=5), cfg)
  fx.write_tokenizer(d, ["one two three four five six"] * 3)
  return hub.load_pretrained(d)


@functools.lru_cache(maxsize=None)
def _quantizer(kw):
  return jax.jit(functools.partial(quantize_array, **dict(kw)))


def quantize(variables, paths, **kw):
  f = _quantizer(tuple(sorted(kw.items())))
  return map_with_paths(lambda p, x: f(x) if p in paths else x, variables)


@jax.jit
def materialize(q):
  return q.materialize()


def _leaf(variables, path):
  node = variables
  for k in path.split("/"):
    node = node[k]
  return node


# -- exactness -----------------------------------------------------------------


@pytest.mark.parametrize("bits,sym,group,fmt", [
    (4, True, None, "gptq"), (4, True, 16, "gptq"), (4, False, None, "gptq"),
    (4, False, 16, "gptq"), (4, False, 16, "gptq_v2"), (8, True, None, "gptq"),
    (8, True, 16, "gptq"), (8, False, None, "gptq"), (8, False, 16, "gptq"),
    (2, False, 16, "gptq_v2"), (3, True, 16, "gptq"),
])
def test_export_matches_materialize(toy, tmp_path, bits, sym, group, fmt):
  paths = (UP, PROJ)
  q = quantize(toy.variables, paths, bits=bits, symmetric=sym,
               group_size=group, scale_dtype=jnp.float16)
  rep = hub.save_gptq(tmp_path, toy, q, checkpoint_format=fmt)
  for path in paths:
    qa = _leaf(q, path)
    w, t, cfg = read_gptq(tmp_path, HF[path], fmt)
    k, n = qa.shape
    g = k if group is None else group
    assert t[HF[path] + ".qweight"].shape == (k * bits // 32, n)
    assert t[HF[path] + ".qzeros"].shape == (k // g, n * bits // 32)
    assert t[HF[path] + ".scales"].shape == (k // g, n)
    np.testing.assert_array_equal(t[HF[path] + ".g_idx"], np.arange(k) // g)
    np.testing.assert_array_equal(w, np.asarray(materialize(qa)))
  # Bias, norms, embeddings and unquantized Linears stay float16 under their
  # HF names; quantized Linears have no float weight.
  with safe_open(str(tmp_path / "model.safetensors"), "numpy") as h:
    names = set(h.keys())
    assert h.get_tensor("model.layers.0.up.bias").dtype == np.float16
    np.testing.assert_array_equal(
        h.get_tensor("model.layers.1.up.weight"),
        np.asarray(toy.variables["params"]["block_1"]["up"]["kernel"]).T
        .astype(np.float16))
  assert "model.layers.0.up.weight" not in names and "model.proj.bias" in names
  assert cfg == {**cfg, "bits": bits, "group_size": group or -1, "sym": sym,
                 "desc_act": False, "checkpoint_format": fmt,
                 "quant_method": "gptq", "lm_head": False}
  assert "-:^model\\.layers\\.0\\.down$" in cfg["dynamic"]
  assert "-:^lm_head$" not in cfg["dynamic"]
  full = json.loads((tmp_path / "config.json").read_text())
  assert full["quantization_config"] == cfg and full["model_type"] == "cj_toy"
  assert full["torch_dtype"] == "float16"
  assert (tmp_path / "tokenizer.json").is_file()
  assert rep.scales_exact and all(
      l.max_abs_error == 0 and l.bits == bits for l in rep.layers)


def _qarray(codes, scale, zero, bits, symmetric, dtype="float32"):
  """A QArray built by hand (axis 0), packed as the layout defines."""
  fmt = IntFormat(bits, symmetric)
  stored = np.asarray(fmt.encode(jnp.asarray(codes, jnp.float32)))
  packed = (np.asarray(layout.pack(stored, bits, 0)) if bits < 8 else stored)
  return QArray(codes=jnp.asarray(packed), scale=jnp.asarray(scale),
                zero=None if zero is None else jnp.asarray(zero, jnp.uint8),
                shape=codes.shape, dtype=dtype, fmt=fmt, contract=(0,))


def test_full_range_symmetric_grid_and_known_words(toy, tmp_path):
  """Symmetric codes over all of -8..7 (the full-range grid) export exactly,
  sym=True, and v1 qzeros are the well-known 0x77777777 words."""
  rng = np.random.default_rng(0)
  codes = rng.integers(-8, 8, (32, 64))
  codes[:16, 0] = np.arange(-8, 8)
  scale = (rng.uniform(0.01, 0.1, (2, 64))).astype(np.float16)
  qa = _qarray(codes, scale, None, 4, True)
  q = map_with_paths(lambda p, x: qa if p == UP else x, toy.variables)
  rep = hub.save_gptq(tmp_path, toy, q)
  w, t, cfg = read_gptq(tmp_path, HF[UP], "gptq")
  np.testing.assert_array_equal(w, np.asarray(materialize(qa)))
  np.testing.assert_array_equal(
      w, codes * np.repeat(scale.astype(np.float32), 16, 0))
  assert np.all(t[HF[UP] + ".qzeros"] == 0x77777777) and cfg["sym"]
  # The first 8 codes of column 0 (-8..-1 -> 0..7) sit LSB first in word 0.
  assert t[HF[UP] + ".qweight"][0, 0] == 0x76543210
  assert rep.layers[0].sym and rep.quantization_config["group_size"] == 16


def test_zero_point_zero_needs_v2(toy, tmp_path):
  codes = np.random.default_rng(1).integers(0, 16, (32, 64))
  zero = np.full((1, 64), 3)
  zero[0, 5] = 0  # a group of non-negative weights
  qa = _qarray(codes, np.full((1, 64), 0.25, np.float32), zero, 4, False)
  q = map_with_paths(lambda p, x: qa if p == DOWN.replace("down", "up")
                     else x, toy.variables)
  with pytest.raises(CompressionError, match=r"1 groups have zero point 0.*"
                     r"gptq_v2.*block_0/up/kernel"):
    hub.save_gptq(tmp_path / "v1", toy, q)
  assert not (tmp_path / "v1").exists()  # refused before writing anything
  rep = hub.save_gptq(tmp_path / "v2", toy, q, checkpoint_format="gptq_v2")
  w, t, cfg = read_gptq(tmp_path / "v2", HF[UP], "gptq_v2")
  np.testing.assert_array_equal(w, np.asarray(materialize(qa)))
  assert not cfg["sym"] and not rep.layers[0].sym
  assert cfg["group_size"] == -1


def test_inexact_scales_warn_or_error(toy, tmp_path):
  q = quantize(toy.variables, (UP,), bits=4, group_size=16)  # float32 scales
  qa = _leaf(q, UP)
  with pytest.warns(UserWarning, match=r"1 of 1 layers.*not float16.*"
                    r"scale_dtype=jnp.float16"):
    rep = hub.save_gptq(tmp_path / "a", toy, q)
  w, _, _ = read_gptq(tmp_path / "a", HF[UP], "gptq")
  ref = np.asarray(materialize(qa))
  # Independent error of the f16-rounded scales, as the report states it.
  rel = np.linalg.norm(w - ref) / np.linalg.norm(ref)
  layer = rep.layers[0]
  assert not rep.scales_exact and not layer.scales_exact
  np.testing.assert_allclose(layer.rel_error, rel, rtol=1e-5)
  np.testing.assert_allclose(layer.max_abs_error, np.max(np.abs(w - ref)),
                             rtol=1e-5)
  assert 0 < rel < 2 ** -11  # f16 rounding of the scales, relative 2^-11
  with pytest.raises(CompressionError, match="not float16 values"):
    hub.save_gptq(tmp_path / "b", toy, q, inexact_scales="error")


def _with(toy, path, leaf):
  return map_with_paths(lambda p, x: leaf if p == path else x, toy.variables)


def _q(shape, bits=4, fmt=None, axis=0, symmetric=True):
  fmt = fmt or IntFormat(bits, symmetric)
  lay = MatrixLayout(shape, (axis,))
  rows = lay.k if fmt.bits >= 8 else -(-lay.k * fmt.bits // 8)  # packed
  return QArray(codes=np.zeros((rows, lay.n), np.uint8),
                scale=np.ones((1, lay.n), np.float32), zero=None, shape=shape,
                dtype="float32", fmt=fmt, contract=(axis,))


@pytest.mark.parametrize("path,leaf,match", [
    (UP, SparseArray(np.zeros(8), np.zeros((32, 64), bool), (32, 64),
                     "float32", (1, 1), "unstructured"),
     r"SparseArray leaf has no GPTQ form"),
    (UP, LowRank(np.zeros((32, 4)), np.zeros((4, 64)), None, (32, 64),
                 "float32"), r"LowRank leaf has no GPTQ form"),
    (UP, _q((32, 64), fmt=NF4), r"nf4 codes have no GPTQ form"),
    (UP, _q((32, 64), axis=1), r"groups run along axes \(1,\)"),
    (UP, _q((32, 64), bits=5), r"5-bit codes"),
    ("params/lm_head/kernel", _q((32, 40), bits=3), r"multiples of 32"),
    ("params/embed/embedding", _q((40, 32)), r"'model.embed.weight' is not a "
     r"Linear weight"),
    ("params/patch/kernel", _q((2, 2, 3, 32)), r"'model.patch.weight' is not"),
])
def test_refused_with_param_named(toy, tmp_path, path, leaf, match):
  with pytest.raises(CompressionError, match=match + r".*\[param '"
                     + path + "'"):
    hub.save_gptq(tmp_path, toy, _with(toy, path, leaf))


def test_refused_tree_level(toy, tmp_path):
  with pytest.raises(CompressionError, match="no quantized Linear weight"):
    hub.save_gptq(tmp_path, toy, toy.variables)
  a = _qarray(np.zeros((32, 64), int), np.ones((1, 64), np.float16), None, 4,
              True)
  b = _qarray(np.zeros((32, 32), int), np.ones((1, 32), np.float16), None, 8,
              True)
  q = map_with_paths(lambda p, x: {UP: a, PROJ: b}.get(p, x), toy.variables)
  with pytest.raises(CompressionError, match=r"mixes 4 bits / group -1 .*"
                     r"8 bits / group -1"):
    hub.save_gptq(tmp_path, (toy.family, toy.config), q)
  with pytest.raises(CompressionError, match="checkpoint_format 'gptq_v3'"):
    hub.save_gptq(tmp_path, toy, q, checkpoint_format="gptq_v3")
  assert not tmp_path.joinpath("config.json").exists()


def test_bfloat16_qarray(toy, tmp_path):
  """A bf16 model's QArray: W = (q - z) * s in float32 then rounded to
  bfloat16 is materialize() exactly."""
  rng = np.random.default_rng(2)
  qa = _qarray(rng.integers(0, 256, (32, 32)),
               rng.uniform(1e-3, 1e-2, (2, 32)).astype(np.float16),
               rng.integers(1, 256, (2, 32)), 8, False, dtype="bfloat16")
  rep = hub.save_gptq(tmp_path, toy, _with(toy, PROJ, qa), dtype="bfloat16")
  w, t, cfg = read_gptq(tmp_path, HF[PROJ], "gptq")
  ref = np.asarray(materialize(qa))
  assert ref.dtype == jnp.bfloat16
  np.testing.assert_array_equal(w.astype(jnp.bfloat16), ref)
  assert rep.layers[0].max_abs_error == 0 and cfg["bits"] == 8
  with safe_open(str(tmp_path / "model.safetensors"), "numpy") as h:
    assert h.get_tensor("model.proj.bias").dtype == jnp.bfloat16
    assert h.get_tensor(HF[PROJ] + ".scales").dtype == np.float16
