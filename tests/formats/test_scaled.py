"""ScaledFormat.fake_quantize is quantize(...).materialize() without packed
codes (the searches of AWQ evaluate it), for any layout option."""

import jax
import numpy as np
import pytest

from compressjax import formats


@pytest.mark.parametrize("name,kw", [
    ("int4_asym", dict(contract=(0,), group_size=16)),
    ("int3", dict(contract=(0,))),
    ("nf4", dict(contract=(0, 1), group_size=8)),
    ("fp8_e4m3", dict(contract=(0,), per_tensor=True)),
    ("int4_asym", dict(contract=(0,), group_size=16, scale_dtype="float16")),
    ("int4", dict(contract=(0,), group_size=32, key=jax.random.key(1))),
    ("mxfp4", dict(contract=(0, 1))),  # block scales: Format's default
])
def test_fake_quantize_is_quantize_materialized(name, kw):
  fmt = formats.resolve(name, None, True, path=name)
  w = np.random.default_rng(0).standard_normal((32, 4, 6)).astype(np.float32)
  w[..., 0] = 0  # all-zero groups
  w[..., 1] = np.abs(w[..., 1])  # groups with no negative values
  want = np.asarray(fmt.quantize(w, **kw).materialize(), np.float32)
  got = np.asarray(jax.jit(lambda w: fmt.fake_quantize(w, **kw))(w))
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, w)  # it did quantize
