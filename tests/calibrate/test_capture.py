"""Calibration capture: statistics against numpy float64, and clear errors on
bad batches (naming the batch, and the layer for non-finite statistics)."""

import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.calibrate import capture

RNG = np.random.default_rng(0)
P = {"l0": {"kernel": RNG.standard_normal((8, 16), np.float32)},
     "l1": {"kernel": RNG.standard_normal((16, 4), np.float32)}}


def mlp(t, x):
  return jnp.tanh(x @ t["l0"]["kernel"]) @ t["l1"]["kernel"]


def _batches(n=3):
  return [RNG.standard_normal((5, 8), np.float32) for _ in range(n)]


def test_statistics_match_float64():
  bs = _batches()
  st = capture(mlp, P, bs)
  x0 = np.concatenate(bs).astype(np.float64)
  x1 = np.tanh(x0 @ P["l0"]["kernel"].astype(np.float64))
  for path, x in (("l0/kernel", x0), ("l1/kernel", x1)):
    s = st[path]
    np.testing.assert_allclose(s.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.abs_sum, np.abs(x).sum(0), rtol=1e-5)
    np.testing.assert_allclose(s.sq_sum, (x * x).sum(0), rtol=1e-5)
    np.testing.assert_allclose(s.abs_max, np.abs(x).max(0), rtol=1e-6)
    assert float(s.count) == 15


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_names_the_batch_and_layer(bad):
  bs = _batches()
  bs[1] = bs[1].copy()
  bs[1][2, 3] = bad
  with pytest.raises(cj.CompressionError, match=(
      r"calibration batch 1 \(0-based\) gives non-finite statistics .* for [12] "
      r"layer\(s\), first 'l0/kernel'")) as e:
    capture(mlp, P, bs)
  assert e.value.path == "l0/kernel"


def test_overflow_inside_the_model_is_caught_at_its_layer():
  big = {"l0": {"kernel": np.full((8, 16), 1e30, np.float32)},
         "l1": P["l1"]}
  fn = lambda t, x: (x @ t["l0"]["kernel"]) @ t["l1"]["kernel"]
  with pytest.raises(cj.CompressionError, match="batch 0 .* first "
                     "'l1/kernel'") as e:
    capture(fn, big, _batches(1))
  assert e.value.path == "l1/kernel"


@pytest.mark.parametrize("batches,match", [
    ([np.ones((5, 8), np.float32), np.ones((5, 7), np.float32)],
     r"calibration batch 1 \(ndarray\(5, 7\) float32\) fails in the model: "
     r".*check the batch's shape"),
    ([np.ones((5, 8), np.float32), np.ones((8,), np.float32)],
     r"calibration batch 1 .* differs in structure or rank from batch 0"),
    ([np.ones((5, 8), np.float32), "some text"],
     r"calibration batch 1: argument \[0\] is a str .* not an array"),
    ([(np.ones((5, 8), np.float32), None)],
     r"calibration batch 0: argument \[1\] is a NoneType"),
    ([[np.ones((5, 8), np.float32)]], r"calibration batch 0 is a list"),
    (np.ones((3, 5, 8), np.float32), r"batches must be an iterable of "
     r"batches, got a ndarray; pass \[x\]"),
    ([], "capture got no batches"),
])
def test_bad_batches_are_clear_errors(batches, match):
  with pytest.raises(cj.CompressionError, match=match):
    capture(mlp, P, batches)
