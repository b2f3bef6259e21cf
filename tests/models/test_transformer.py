"""The reference LM's attention paths agree: XLA einsum + softmax and the
Pallas block-sparse kernel (interpret mode), causal and sliding window."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj
from compressjax.models import transformer

CFG = transformer.TransformerConfig(d_model=32, n_layers=2, n_heads=2,
                                    d_mlp=64, seq_len=48, attention_block=16)


@pytest.mark.parametrize("window", [None, 12])
def test_pallas_attention_equals_xla(window):
  cfg = dataclasses.replace(CFG, window=window)
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
  xla = transformer.TransformerLM(cfg)
  pallas = transformer.TransformerLM(
      dataclasses.replace(cfg, attention="pallas"))
  params = xla.init(jax.random.key(1), tokens)
  # a quantized tree, so the kernel runs next to the compressed matmuls
  q = cj.quantize(params, 8)

  def loss(model):
    return lambda p: jnp.mean(cj.run(model, p, tokens) ** 2)

  np.testing.assert_allclose(jax.jit(lambda p: cj.run(pallas, p, tokens))(q),
                             jax.jit(lambda p: cj.run(xla, p, tokens))(q),
                             rtol=2e-5, atol=2e-5)
  if window is not None:
    return  # one gradient check is enough (interpreted backward is slow)
  gp = jax.jit(jax.grad(loss(pallas)))(params)
  gx = jax.jit(jax.grad(loss(xla)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), gp, gx)


def test_window_restricts_attention():
  """With window 1 every token sees only itself: the output at position i
  does not depend on earlier tokens."""
  cfg = dataclasses.replace(CFG, window=1)
  model = transformer.TransformerLM(cfg)
  a = jnp.arange(40)[None] % 256
  b = a.at[0, :10].set(7)
  params = model.init(jax.random.key(1), a)
  ya, yb = model.apply(params, a), model.apply(params, b)
  np.testing.assert_allclose(ya[0, 10:], yb[0, 10:], rtol=1e-5, atol=1e-6)


def test_bad_attention_config():
  with pytest.raises(ValueError, match="attention must be"):
    transformer.TransformerConfig(attention="flash")
  with pytest.raises(ValueError, match="window must be"):
    transformer.TransformerConfig(window=0)
