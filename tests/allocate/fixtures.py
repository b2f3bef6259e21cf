"""A tiny MLP with calibration statistics, shared by the allocate tests."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax.calibrate import capture

D_IN = 32


@functools.lru_cache(maxsize=None)
def mlp():
  """(model, variables, stats, batches): kernels (32,32), (32,32), (32,16);
  batches are (inputs, targets) pairs, stats captured on their inputs."""
  model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(32), nn.relu,
                         nn.Dense(16)])
  xs = [jax.random.normal(jax.random.key(i), (24, D_IN)) for i in range(3)]
  # per-feature scales spread over 2 decades: the Gram is far from identity
  xs = [x * jnp.exp(jnp.linspace(-2.3, 2.3, D_IN)) for x in xs]
  v = model.init(jax.random.key(9), xs[0])
  ys = [jnp.tanh(model.apply(v, x)) + 0.1 for x in xs]
  stats = capture(model, v, xs)
  return model, v, stats, list(zip(xs, ys))


def mse_loss(model):
  def loss(params, batch):
    x, y = batch
    return jnp.mean((model.apply(params, x) - y) ** 2)
  return loss
