"""compressjax.train.loop on a tiny MLP regression: learning, logging, exact
resume, compressed trees, errors, (own process, 8 host devices) sharding, and
2 local processes under jax.distributed (data parallel across them, model
sharded within), equal to the single-process run, checkpoints moving between
1 and 2 processes."""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.train.loop import (TrainState, epoch_batches, init_state,
                                    process_mesh, train)

MODEL = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(1)])


def _data(n=256, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, 8)).astype(np.float32)
  y = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype(np.float32)
  return {"x": x, "y": y}


@functools.cache
def _params():
  # cached: train copies its inputs, never consumes them
  return jax.jit(MODEL.init)(jax.random.key(1), jnp.zeros((1, 8)))["params"]


def loss_fn(params, batch, rng):
  # input noise makes the result depend on the per-step rng
  x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
  err = MODEL.apply({"params": params}, x) - batch["y"]
  return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def _masked_counter() -> optax.GradientTransformation:
  """An optax transformation whose state holds a bool mask and an int count,
  as sparse-training ones do: zeroes the update of small-magnitude params."""
  def init(params):
    return {"mask": jax.tree.map(lambda p: jnp.abs(p) > 0.05, params),
            "count": jnp.zeros((), jnp.int32)}

  def update(updates, state, params):
    del params
    return (jax.tree.map(lambda u, m: u * m, updates, state["mask"]),
            {"mask": state["mask"], "count": state["count"] + 1})

  return optax.GradientTransformation(init, update)


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_loss_decreases_and_inputs_are_kept():
  params = _params()
  out = train(loss_fn, params, optax.adam(1e-2),
              epoch_batches(_data(), 32, seed=0), steps=80, log_every=20,
              progress=False)
  losses = [h["loss"] for h in out.history]
  assert [h["step"] for h in out.history] == [20, 40, 60, 80]
  assert losses[-1] < 0.5 * losses[0], losses
  assert set(out.history[0]) == {"step", "loss", "mae", "seconds"}
  assert isinstance(out.state, TrainState)
  assert out.state.step.dtype == jnp.int32 and int(out.state.step) == 80
  # the step donates its state, never the caller's arrays
  assert np.isfinite(np.asarray(params["layers_0"]["kernel"])).all()


def test_jsonl_tensorboard_eval_and_progress(tmp_path):
  calls, lines = [], []

  def eval_fn(p):
    calls.append(1)
    b = _data(64, seed=1)
    return {"mse": loss_fn(p, b, jax.random.key(0))[0]}

  wd = str(tmp_path / "run")
  out = train(loss_fn, _params(), optax.sgd(1e-2),
              epoch_batches(_data(), 32), steps=12, log_every=5,
              eval_fn=eval_fn, eval_every=4, workdir=wd,
              progress=lines.append)
  assert len(calls) == 3
  assert [e["step"] for e in out.evals] == [4, 8, 12]
  rows = _read_jsonl(wd)
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval/mse" in r]
  assert [r["step"] for r in train_rows] == [5, 10, 12]
  assert [r["step"] for r in eval_rows] == [4, 8, 12]
  assert train_rows == out.history and eval_rows == out.evals
  assert all(isinstance(r["loss"], float) and r["seconds"] >= 0
             for r in train_rows)
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(wd, "tb")))
  assert lines[0].startswith("step 4/12 eval/mse ")
  assert lines[1].startswith("step 5/12 loss ") and "it/s" in lines[1]
  assert len(lines) == 6


def test_tensorboard_off_and_no_progress(tmp_path, capsys):
  wd = str(tmp_path / "run")
  bare = lambda p, b, r: loss_fn(p, b, r)[0]   # a bare loss, no metrics
  train(bare, _params(), optax.sgd(1e-2), epoch_batches(_data(), 32),
        steps=3, log_every=1, workdir=wd, tensorboard=False, progress=False)
  assert not os.path.exists(os.path.join(wd, "tb"))
  assert [set(r) for r in _read_jsonl(wd)] == [{"step", "loss", "seconds"}] * 3
  assert capsys.readouterr().out == ""


def test_killed_run_resumes_bit_identical(tmp_path):
  opt = optax.chain(_masked_counter(), optax.adam(1e-2))
  data = epoch_batches(_data(), 48, seed=3)   # 5 batches / epoch: crosses one
  kw = dict(steps=10, seed=7, checkpoint_every=4, log_every=1,
            progress=False)
  ref = train(loss_fn, _params(), opt, data, workdir=str(tmp_path / "a"),
              **kw)

  def dying(step):
    if step == 7:
      raise KeyboardInterrupt("killed")
    return data(step)

  wd = str(tmp_path / "b")
  with pytest.raises(KeyboardInterrupt):
    train(loss_fn, _params(), opt, dying, workdir=wd, **kw)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4"]
  res = train(loss_fn, _params(), opt, data, workdir=wd, **kw)
  assert [h["step"] for h in res.history] == list(range(5, 11))
  _leaves_equal(res.state.params, ref.state.params)
  _leaves_equal(res.state.opt_state, ref.state.opt_state)
  _leaves_equal(res.state, ref.state)   # step and rng too
  # the log was rolled back to the checkpoint, then redone identically
  rows, ref_rows = _read_jsonl(wd), _read_jsonl(str(tmp_path / "a"))
  assert [r["step"] for r in rows] == list(range(1, 11))
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
  # keep=2: the newest two of 4, 8, 10
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "8"]
  # a finished run resumes to a no-op
  again = train(loss_fn, _params(), opt, dying, workdir=wd, **kw)
  assert again.history == [] and int(again.state.step) == 10
  _leaves_equal(again.state, ref.state)


def test_compressed_tree_float_part_with_extra(tmp_path):
  q = cj.quantize({"params": _params()}, 8)
  flo, rest = cj.partition_float(q)

  def loss(p, batch, rng, extra):
    tree = cj.combine(p, rest)
    err = cj.run(MODEL, tree, batch["x"]) - batch["y"]
    l = jnp.mean(err ** 2)
    # extra: an untrained running average, updated by loss_fn
    return l, ({}, {"ema": 0.9 * extra["ema"] + 0.1 * l})

  wd = str(tmp_path / "q")
  kw = dict(workdir=wd, checkpoint_every=2, log_every=1, progress=False,
            tensorboard=False)
  extra = {"ema": jnp.zeros(())}
  a = train(loss, flo, optax.adam(1e-3), epoch_batches(_data(), 32), steps=4,
            extra=extra, **kw)
  assert float(a.state.extra["ema"]) > 0
  b = train(loss, flo, optax.adam(1e-3), epoch_batches(_data(), 32), steps=6,
            extra=extra, **kw)
  assert [h["step"] for h in b.history] == [5, 6]
  k = b.params["params"]["layers_0"]["kernel"]
  assert isinstance(k, cj.QArray) and k.codes is None
  # the scales were trained; the integer codes stayed in `rest`
  k0 = flo["params"]["layers_0"]["kernel"]
  assert not np.array_equal(np.asarray(k.scale), np.asarray(k0.scale))


def test_state_argument_and_init_state():
  st = init_state(_params(), optax.sgd(1e-2), seed=3)
  out = train(loss_fn, None, optax.sgd(1e-2), epoch_batches(_data(), 32),
              steps=2, state=st, progress=False)
  assert int(out.state.step) == 2 and int(st.step) == 0  # st not consumed
  out2 = train(loss_fn, None, optax.sgd(1e-2), epoch_batches(_data(), 32),
               steps=4, state=out.state, progress=False)
  ref = train(loss_fn, _params(), optax.sgd(1e-2), epoch_batches(_data(), 32),
              steps=4, seed=3, progress=False)
  _leaves_equal(out2.state, ref.state)


def test_optimizer_state_holding_the_params():
  # e.g. lookahead / EMA keep a copy of the params: no double donation
  keep = optax.GradientTransformation(
      lambda p: {"copy": p}, lambda u, s, p: (u, {"copy": p}))
  out = train(loss_fn, _params(), optax.chain(keep, optax.sgd(1e-2)),
              epoch_batches(_data(), 32), steps=2, progress=False)
  assert int(out.state.step) == 2
  k = out.state.opt_state[0]["copy"]["layers_0"]["kernel"]
  assert np.isfinite(np.asarray(k)).all()


def test_epoch_batches_is_a_pure_function_of_step():
  d = {"x": np.arange(10)[:, None], "y": np.arange(10)}
  f, g = epoch_batches(d, 3, seed=1), epoch_batches(d, 3, seed=1)
  seq = [f(s)["y"] for s in range(7)]
  np.testing.assert_array_equal(g(5)["y"], seq[5])   # random access
  np.testing.assert_array_equal(f(2)["y"], seq[2])   # going back
  # 3 batches per epoch, remainder dropped, no repeats within an epoch
  assert len(set(np.concatenate(seq[:3]).tolist())) == 9
  np.testing.assert_array_equal(f(0)["x"][:, 0], f(0)["y"])
  with pytest.raises(ValueError, match="batch_size"):
    epoch_batches(d, 11)
  with pytest.raises(ValueError, match="leading"):
    epoch_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2)


def test_bad_inputs_raise_clear_errors(tmp_path):
  p, opt, data = _params(), optax.sgd(1e-2), epoch_batches(_data(), 32)
  with pytest.raises(ValueError, match="checkpoint_every needs workdir"):
    train(loss_fn, p, opt, data, steps=2, checkpoint_every=1)
  with pytest.raises(ValueError, match="eval_every needs eval_fn"):
    train(loss_fn, p, opt, data, steps=2, eval_every=1)
  with pytest.raises(ValueError, match="need mesh"):
    train(loss_fn, p, opt, data, steps=2,
          param_sharding=jax.sharding.PartitionSpec())
  with pytest.raises(ValueError, match="partition_float"):
    train(loss_fn, cj.quantize(p, 8), opt, data, steps=2)
  with pytest.raises(ValueError, match="metric 'v' has shape"):
    train(lambda p, b, r: (loss_fn(p, b, r)[0], {"v": b["y"]}), p, opt,
          data, steps=2, progress=False)
  # a checkpoint from a different optimizer cannot be resumed into
  wd = str(tmp_path / "w")
  train(loss_fn, p, opt, data, steps=1, workdir=wd, checkpoint_every=1,
        progress=False, tensorboard=False)
  with pytest.raises(ValueError, match="does not match"):
    train(loss_fn, p, optax.adam(1e-2), data, steps=2, workdir=wd,
          progress=False, tensorboard=False)


SHARDED = textwrap.dedent("""
    import os, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, os.path.dirname(TEST_FILE))
    import test_loop as t
    from compressjax.train.loop import train, epoch_batches, shard_last_dim

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    opt = optax.chain(t._masked_counter(), optax.adam(1e-2))
    data = epoch_batches(t._data(), 32, seed=0)
    kw = dict(steps=8, log_every=1, progress=False, tensorboard=False)
    ref = train(t.loss_fn, t._params(), opt, data, **kw)
    sk = dict(mesh=mesh, param_sharding=shard_last_dim(mesh, "model"), **kw)
    d = tempfile.mkdtemp()
    sh = train(t.loss_fn, t._params(), opt, data, workdir=d + "/a",
               checkpoint_every=3, **sk)
    np.testing.assert_allclose([h["loss"] for h in sh.history],
                               [h["loss"] for h in ref.history], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sh.state), jax.tree.leaves(ref.state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-6)
    k = sh.params["layers_0"]["kernel"]
    assert k.sharding.spec == P(None, "model"), k.sharding
    assert len(k.sharding.device_set) == 8
    assert sh.params["layers_2"]["kernel"].sharding.spec == P()  # 1 % 2
    mu = sh.state.opt_state[1][0].mu["layers_0"]["kernel"]
    mask = sh.state.opt_state[0]["mask"]["layers_0"]["kernel"]
    assert mu.sharding.spec == mask.sharding.spec == P(None, "model")

    # kill at 5, resume: bit-identical to the uninterrupted sharded run,
    # and the restored state keeps the shardings
    def dying(s):
      if s == 5:
        raise RuntimeError("killed")
      return data(s)
    try:
      train(t.loss_fn, t._params(), opt, dying, workdir=d + "/b",
            checkpoint_every=3, **sk)
      raise AssertionError("no kill")
    except RuntimeError:
      pass
    res = train(t.loss_fn, t._params(), opt, data, workdir=d + "/b",
                checkpoint_every=3, **sk)
    assert [h["step"] for h in res.history] == [4, 5, 6, 7, 8]
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(sh.state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == b.sharding, (a.sharding, b.sharding)

    # steps at or below the checkpoint's: just load it, shardings included
    back = train(t.loss_fn, t._params(), opt, data, workdir=d + "/a",
                 **dict(sk, steps=0))
    assert int(back.state.step) == 8 and back.history == []
    for a, b in zip(jax.tree.leaves(back.state), jax.tree.leaves(sh.state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == b.sharding, (a.sharding, b.sharding)

    # param_sharding as a spec pytree (a prefix: None replicates a subtree);
    # by default, params already placed on the mesh keep their layout
    st = train(t.loss_fn, t._params(), opt, data, **dict(
        sk, steps=0, param_sharding={"layers_0": {"kernel": P("data"),
                                                  "bias": P("model")},
                                     "layers_2": None})).state
    assert st.params["layers_0"]["kernel"].sharding.spec == P("data")
    assert st.params["layers_0"]["bias"].sharding.spec == P("model")
    assert st.params["layers_2"]["bias"].sharding.spec == P()
    assert st.opt_state[1][0].nu["layers_0"]["bias"].sharding.spec == \
        P("model")
    st2 = train(t.loss_fn, st.params, opt, data,
                **dict(kw, steps=0, mesh=mesh)).state
    assert jax.tree.map(lambda x: x.sharding, st2.params) == \
        jax.tree.map(lambda x: x.sharding, st.params)

    # the user's arrays survive all the donating steps above
    assert np.isfinite(np.asarray(t._params()["layers_0"]["kernel"])).all()

    # a batch the data axis cannot split, a mesh without a "data" axis
    try:
      train(t.loss_fn, t._params(), opt, epoch_batches(t._data(), 6), **sk)
      raise AssertionError("no error")
    except ValueError as e:
      assert "multiple of 4" in str(e) and "batch_sharding" in str(e), e
    m2 = Mesh(np.array(jax.devices()).reshape(8), ("batch",))
    try:
      train(t.loss_fn, t._params(), opt, data, **dict(kw, mesh=m2))
      raise AssertionError("no error")
    except ValueError as e:
      assert "no 'data' axis" in str(e), e
    print("SHARDED_OK")
""")


def test_sharded_8_devices_matches_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  code = f"TEST_FILE = {os.path.abspath(__file__)!r}\n" + SHARDED
  out = subprocess.run([sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__)))))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "SHARDED_OK" in out.stdout


WORKER = textwrap.dedent("""
    import os, sys
    pid, port, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    import numpy as np, optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, os.path.dirname(TEST_FILE))
    import test_loop as t
    from compressjax.core.errors import CompressionError
    from compressjax.train.loop import (epoch_batches, process_mesh,
                                        shard_last_dim, train)

    assert jax.process_count() == 2 and jax.local_device_count() == 2
    mesh = process_mesh(model=2)
    # the data axis over the processes, the model axis within one
    assert mesh.shape == {"data": 2, "model": 2}
    assert [{x.process_index for x in row} for row in mesh.devices] == \\
        [{0}, {1}]
    opt = optax.chain(t._masked_counter(), optax.adam(1e-2))
    data = epoch_batches(t._data(), 32, seed=0)
    kw = dict(mesh=mesh, param_sharding=shard_last_dim(mesh, "model"),
              log_every=1, progress=False, tensorboard=False,
              checkpoint_every=3)
    # stops at 3 (as if killed) for the single process to resume
    a = train(t.loss_fn, t._params(), opt, data, steps=3,
              workdir=d + "/a", **kw)
    k = a.params["layers_0"]["kernel"]
    assert k.sharding.spec == P(None, "model") and not k.is_fully_addressable
    # resumes the single-process checkpoint at step 3 on this mesh
    b = train(t.loss_fn, t._params(), opt, data, steps=6, workdir=d + "/b",
              **kw)
    assert [h["step"] for h in b.history] == [4, 5, 6]

    # a process count that does not divide the data axis
    bad = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "model"))
    try:
      train(t.loss_fn, t._params(), opt, data, steps=1, mesh=bad)
      raise AssertionError("no error")
    except CompressionError as e:
      assert "process count 2 does not divide" in str(e), e
    try:
      train(t.loss_fn, t._params(), opt, data, steps=1)
      raise AssertionError("no error")
    except CompressionError as e:
      assert "needs mesh=" in str(e), e

    out = {}
    for name, r in (("a", a), ("b", b)):
      gathered = multihost_utils.process_allgather(r.state.params,
                                                   tiled=True)
      for i, x in enumerate(jax.tree.leaves(gathered)):
        out[f"{name}_p{i}"] = np.asarray(x)
      out[f"{name}_loss"] = np.array([h["loss"] for h in r.history])
    if pid == 0:
      np.savez(d + "/out.npz", **out)
    # only process 0 writes the metrics
    print("WORKER_OK", pid, os.path.exists(d + "/a/metrics.jsonl"))
    jax.distributed.shutdown()
""")


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(d: str) -> list[str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  code = f"TEST_FILE = {os.path.abspath(__file__)!r}\n" + WORKER
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  port = str(_port())
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i), port, d],
                            env=env, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-4000:]
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def test_two_processes_equal_single_process_and_reshard(tmp_path):
  d = str(tmp_path)
  opt = optax.chain(_masked_counter(), optax.adam(1e-2))
  data = epoch_batches(_data(), 32, seed=0)
  kw = dict(log_every=1, progress=False, tensorboard=False)
  ref = train(loss_fn, _params(), opt, data, steps=6, workdir=d + "/b",
              checkpoint_every=3, **kw)
  # a run killed after its step-3 checkpoint: the 2 processes resume it
  shutil.rmtree(d + "/b/checkpoints/6")

  outs = _launch(d)
  assert "WORKER_OK 0 True" in outs[0] and "WORKER_OK 1 True" in outs[1]
  got = np.load(d + "/out.npz")
  ref_loss = np.array([h["loss"] for h in ref.history])
  ref_p = [np.asarray(x) for x in jax.tree.leaves(ref.state.params)]
  np.testing.assert_allclose(got["a_loss"], ref_loss[:3], rtol=1e-5)
  np.testing.assert_allclose(got["b_loss"], ref_loss[3:], rtol=1e-5)
  for i, x in enumerate(ref_p):
    np.testing.assert_allclose(got[f"b_p{i}"], x, rtol=1e-5, atol=1e-6)
  # process 0 wrote one line per step
  with open(d + "/a/metrics.jsonl") as f:
    assert len(f.readlines()) == 3

  # the 2-process checkpoint at step 3 resumes in this one process
  c = train(loss_fn, _params(), opt, data, steps=6, workdir=d + "/a",
            **kw)
  assert [h["step"] for h in c.history] == [4, 5, 6]
  for x, y in zip(jax.tree.leaves(c.state), jax.tree.leaves(ref.state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6)


def test_process_mesh_errors():
  with pytest.raises(CompressionError, match="must divide the 1 local"):
    process_mesh(model=2)
  m = process_mesh()
  assert m.shape == {"data": jax.device_count(), "model": 1}
