"""Compressed trees under sharding, on 8 host devices (own process: the device
count must be set before jax starts)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import flax.linen as nn
    import compressjax as cj

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    model = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(64)])
    x = jax.random.normal(jax.random.key(0), (16, 128))
    v = model.init(jax.random.key(1), x)
    c = cj.chain(cj.transforms.sparsify(pattern="nm", n=2, m=4),
                 cj.transforms.quantize(4, group_size=32)).apply(v)
    q = cj.quantize(v, 8)

    def shard(tree):
        # every array child: output features (last axis) over "model"
        def put(a):
            spec = P(*([None] * (a.ndim - 1) + ["model"])) if a.ndim and \\
                a.shape[-1] % 4 == 0 else P()
            return jax.device_put(a, NamedSharding(mesh, spec))
        return jax.tree.map(put, tree)

    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    f = jax.jit(lambda t, x: cj.run(model, t, x))
    for tree in (c, q):
        ts = shard(tree)
        k = ts["params"]["layers_0"]["kernel"]
        leaf = k.values.codes if hasattr(k, "values") else k.codes
        assert len(leaf.sharding.device_set) == 8, leaf.sharding
        y = f(ts, xs)
        ref = model.apply(cj.materialize_tree(tree), x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4,
                                   atol=1e-4)
        # gradients of the float parts keep working when sharded
        flo, rest = cj.partition_float(ts)
        g = jax.jit(jax.grad(lambda fl: jnp.sum(
            cj.run(model, cj.combine(fl, rest), xs) ** 2)))(flo)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    print("SHARDING_OK")
""")


def test_sharded_compressed_model_matches_reference():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "SHARDING_OK" in out.stdout
