"""The Format protocol: every registered scheme is one hashable object that
round-trips through its config and answers what algorithms and kernels ask."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax import formats
from compressjax.core.format import FORMAT_VERSION, format_from_config
from compressjax.formats import IntFormat, LevelsFormat


def test_every_registered_format_knows_itself():
  for name in formats.NAMES:
    fmt = formats.get(name)
    assert formats.get(fmt.name) == fmt, name
    # the config survives JSON (lists come back) as an equal, hashable object
    back = format_from_config(json.loads(json.dumps(fmt.to_config())))
    assert back == fmt and hash(back) == hash(fmt), name
    assert type(back) is type(fmt)
    caps = fmt.capabilities
    if caps.qat or caps.calibrated or caps.zero_point:
      assert caps.float_scale, name
    if not caps.groups:
      assert fmt.block_size, name
    dec = fmt.kernel_decode()
    assert dec is None or sum(v is not None for v in dec) == 1, name


@pytest.mark.parametrize("name", ["int4", "int3_asym", "int8", "nf4",
                                  "ternary", "fp4_e2m1", "fp6_e3m2",
                                  "fp8_e5m2", "mxfp4", "mxint8"])
def test_kernel_decode_agrees_with_decode(name):
  fmt = formats.get(name)
  dec = fmt.kernel_decode()
  vals = np.asarray(fmt.round(jnp.linspace(*fmt.code_range, 97)))
  stored = np.asarray(fmt.encode(jnp.asarray(vals)))
  if dec.table is not None:  # the table maps every stored code it can meet
    t = np.asarray(dec.table, np.float32)
    assert len(t) == 2**fmt.bits
    np.testing.assert_array_equal(t[stored.astype(np.int64)], vals)
  elif dec.offset is not None:
    np.testing.assert_array_equal(stored.astype(np.float32) + dec.offset, vals)
  else:  # float8 bit patterns
    np.testing.assert_array_equal(
        stored.view(np.dtype(dec.float8)).astype(np.float32), vals)


def test_block_schemes_carry_block_and_scale_format():
  mx, nv = formats.get("mxfp4"), formats.get("nvfp4")
  assert (mx.block_size, mx.scale_format.name, mx.bits) == (32, "e8m0", 4)
  assert (nv.block_size, nv.scale_format.name, nv.bits) == (16, "fp8_e4m3", 4)
  assert not mx.capabilities.groups and not nv.capabilities.qat
  assert formats.get("int4").scale_format is None


def test_int_grids_and_names():
  full, narrow = IntFormat(4, narrow_range=False), IntFormat(4, narrow_range=True)
  assert (full.qmin, full.qmax, full.absmax_code) == (-8, 7, 7.5)
  assert (narrow.qmin, narrow.qmax, narrow.absmax_code) == (-7, 7, 7.0)
  assert formats.get("int4") == full  # the measured default (integer.py)
  assert formats.get("int4_full") == full and full.name == "int4"
  assert formats.get("int4_narrow") == narrow and narrow.name == "int4_narrow"
  asym = formats.get("int4", symmetric=False)
  assert asym == formats.get("int4_asym") and asym.capabilities.zero_point
  with pytest.raises(cj.CompressionError, match="asymmetric.*nf4"):
    formats.get("nf4", symmetric=False)


def test_levels_from_a_list_are_a_hashable_tuple():
  a = LevelsFormat("nf4", list(formats.NF4.levels), "absmax")
  assert a == formats.NF4 and hash(a) == hash(formats.NF4)
  assert isinstance(a.levels, tuple)


def test_other_layout_versions_fail_clearly():
  cfg = formats.get("int4").to_config()
  assert cfg["version"] == FORMAT_VERSION
  for old in (dict(cfg, version=1), {k: v for k, v in cfg.items()
                                     if k != "version"}):
    with pytest.raises(cj.CompressionError, match="layout version"):
      format_from_config(old)
  with pytest.raises(cj.CompressionError, match="unknown number format"):
    format_from_config(dict(cfg, kind="int99"))


def test_a_new_format_is_one_object_and_one_entry(tmp_path):
  """A format defined outside the library: quantize, run, checkpoint."""
  pow2 = formats.register(LevelsFormat(
      "pow2_3b", (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0), "absmax"))
  w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
  q = cj.quantize({"k": w}, format="pow2_3b", group_size=16,
                  default=lambda p, x: True)["k"]
  assert q.fmt is pow2 and q.describe() == "pow2_3b g16"
  x = jnp.ones((2, 32))
  np.testing.assert_allclose(cj.apply(lambda t, x: x @ t, q, x),
                             x @ q.materialize(), rtol=1e-5, atol=1e-5)
  cj.save(tmp_path / "c", {"k": q})
  assert cj.restore(tmp_path / "c")["k"].fmt == pow2
