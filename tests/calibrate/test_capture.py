"""Calibration capture: statistics against numpy float64, and clear errors on
bad batches (naming the batch, and the layer for non-finite statistics)."""

import jax
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


# -- token weights (attention masks) ------------------------------------------


def _rows_ref(x, w):
  """float64 statistics of the rows of x (N, K) with weight w > 0."""
  x = np.asarray(x, np.float64)[np.asarray(w) > 0]
  return dict(gram=x.T @ x, abs_sum=np.abs(x).sum(0), sq_sum=(x * x).sum(0),
              abs_max=np.abs(x).max(0), count=len(x))


def test_mask_gives_exactly_the_unpadded_statistics():
  from compressjax.calibrate import Batch
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 6, 8)).astype(np.float32)
  lens = [6, 2, 4]
  mask = (np.arange(6)[None] < np.array(lens)[:, None]).astype(np.int32)
  x[mask == 0] = 1e3  # padding that would dominate every statistic
  fn = lambda t, x: x @ t["l0"]["kernel"]  # noqa: E731
  st = capture(fn, {"l0": P["l0"]}, [Batch((x,), {}, mask)])["l0/kernel"]
  ref = _rows_ref(x.reshape(-1, 8), mask.reshape(-1))
  for k in ("gram", "abs_sum", "sq_sum", "abs_max"):
    np.testing.assert_allclose(getattr(st, k), ref[k], rtol=1e-6, atol=1e-6)
  assert float(st.count) == ref["count"] == 12


def test_token_batches_of_a_decoder_equal_each_text_alone():
  """TokenBatch masks reach a zoo decoder as attention_mask= and weight the
  statistics: padded batches give the statistics of the texts run alone."""
  import jax
  from compressjax.data import text
  from compressjax.models import llama
  cfg = llama.LlamaConfig(vocab_size=256, hidden_size=16,
                          intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2)
  model = llama.LlamaForCausalLM(cfg)
  v = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))
  texts = ["a = 1", "def f(x):", "import os, sys"]
  calib = text.text_batches(texts, text.ByteTokenizer(), batch_size=3,
                            max_length=16, pad_multiple=16, name="snippets")
  st = capture(model, v, calib)
  alone = [capture(model, v, [np.asarray([list(t.encode())], np.int32)])
           for t in texts]
  for path, s in st.items():
    for k in ("gram", "abs_sum", "sq_sum", "abs_max", "count"):
      want = sum(getattr(a[path], k) for a in alone) if k != "abs_max" else \
          np.max([a[path].abs_max for a in alone], 0)
      np.testing.assert_allclose(getattr(s, k), want, rtol=2e-5, atol=2e-5,
                                 err_msg=f"{path} {k}")
  d = st.description
  assert d["source"] == "snippets" and d["tokens"] == sum(map(len, texts))
  assert d["padded_tokens"] == 48 - d["tokens"]
  assert d["padding_in_statistics"] is False


def test_misaligned_weights_are_refused():
  from compressjax.calibrate import Batch
  x = np.ones((2, 5, 8), np.float32)
  with pytest.raises(cj.CompressionError, match=r"token weights .* of shape "
                     r"\(3, 5\) do not align"):
    capture(mlp, P, [Batch((x,), {}, np.ones((3, 5)))])
  with pytest.raises(cj.CompressionError, match="must be >= 0"):
    capture(mlp, P, [Batch((x,), {}, -np.ones((2, 5)))])


Q = {"out": {"kernel": RNG.standard_normal((4, 3, 8), np.float32)},
     "conv": {"kernel": RNG.standard_normal((3, 8, 6), np.float32)}}


def outproj_conv(t, x):
  """x (B, L, heads 4, head_dim 3): an attention out-projection kernel
  (heads, head_dim, d), then a width-3 'SAME' 1-D convolution (W, I, O)."""
  h = jnp.einsum("blhd,hde->ble", x, t["out"]["kernel"])
  return jax.lax.conv_general_dilated(
      h, t["conv"]["kernel"], (1,), "SAME",
      dimension_numbers=("NWC", "WIO", "NWC"))


def test_multi_axis_and_conv_contractions_match_numpy_im2col():
  bs = [RNG.standard_normal((2, 5, 4, 3), np.float32) for _ in range(2)]
  st = capture(outproj_conv, Q, bs)
  assert st["out/kernel"].contract == (0, 1)
  assert st["conv/kernel"].contract == (0, 1)
  x = np.concatenate(bs).astype(np.float64)
  x0 = x.reshape(-1, 12)  # rows: tokens; columns: (head, head_dim)
  h = (x0 @ Q["out"]["kernel"].reshape(12, 8)).reshape(4, 5, 8)
  hp = np.pad(h, ((0, 0), (1, 1), (0, 0)))
  # im2col in the kernel's contracted order (width, in)
  x1 = np.stack([hp[:, t:t + 3].reshape(4, 24) for t in range(5)],
                1).reshape(-1, 24)
  for path, xm in (("out/kernel", x0), ("conv/kernel", x1)):
    s = st[path]
    np.testing.assert_allclose(s.gram, xm.T @ xm, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.sq_sum, (xm * xm).sum(0), rtol=1e-5)
    assert float(s.count) == xm.shape[0]
    v = s.view(Q[path.split("/")[0]]["kernel"].shape)
    w = Q[path.split("/")[0]]["kernel"]
    np.testing.assert_array_equal(v.from_matrix(v.to_matrix(w)), w)
    np.testing.assert_array_equal(v.to_matrix(w), w.reshape(v.k, v.n))
