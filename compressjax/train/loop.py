"""A small, resumable, sharded training loop for compression research.

    import optax
    from compressjax.train.loop import train, epoch_batches

    def loss_fn(params, batch, rng):
      pred = model.apply({"params": params}, batch["x"])
      loss = jnp.mean((pred - batch["y"]) ** 2)
      return loss, {"rmse": jnp.sqrt(loss)}

    out = train(loss_fn, params, optax.adam(1e-3),
                epoch_batches({"x": xs, "y": ys}, batch_size=64, seed=0),
                steps=1000, workdir="runs/exp1", checkpoint_every=200,
                eval_fn=lambda p: {"mse": mse(p, x_val, y_val)},
                eval_every=250)
    params = out.params

    # data x model parallel on 8 devices: batch over "data", the last dim of
    # 2-D kernels over "model"; the optimizer state follows the params
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    out = train(..., mesh=mesh, param_sharding=shard_last_dim(mesh, "model"))

Contract:

* `loss_fn(params, batch, rng) -> (loss, metrics)`: `loss` a scalar, `metrics`
  a dict of scalars (may be omitted: a bare loss is accepted). With `extra=`
  (non-trained state such as batch statistics) it is
  `loss_fn(params, batch, rng, extra) -> (loss, (metrics, new_extra))`.
  `rng` is the typed key `fold_in(key(seed), step)`: a pure function of
  (seed, step). Logged values are those of the logged step (not averaged).
* `batch_fn(step) -> batch`: a pytree of arrays that depends on `step` only
  (see `epoch_batches`). This, and the rng, is what makes resume exact: a run
  killed and restarted with the same `workdir` ends bit-identical to an
  uninterrupted one.
* `params` is exactly the tree that is trained; every leaf must be floating
  point. For a compressed tree (QArray, ... with integer codes) train its
  float part and close over the rest:

      flo, rest = compressjax.partition_float(compressed)
      def loss_fn(p, batch, rng):
        return mse(compressjax.run(model, compressjax.combine(p, rest), ...))
      out = train(loss_fn, flo, optimizer, batch_fn, steps=...)

  Frozen things (a distillation teacher, the codes above) are closed over by
  `loss_fn`; they are neither trained nor checkpointed.
* `optimizer` is any `optax.GradientTransformation`; its state is an opaque
  pytree (masks, counters, ... are checkpointed as they are).

Files under `workdir`: `metrics.jsonl` (one JSON object per log or eval),
`tb/` (TensorBoard scalars, needs `tensorboardX`) and `checkpoints/` (orbax,
the whole TrainState). A run started on a workdir with checkpoints resumes
from the latest; metrics.jsonl and TensorBoard drop what a killed run logged
past it.

Multi-process (`jax.distributed`): every process runs the same `train(...)`
call with a `mesh` over the devices of all processes, e.g. `process_mesh(
model=2)`: the "data" axis spans the processes (data parallel across them),
every other axis stays inside one process (model sharding within). Each
process calls `batch_fn(step)` for the *global* batch (a pure function of the
step, so all agree) and places only its own shards. Only process 0 writes
metrics.jsonl, TensorBoard and progress lines; every process returns the same
history. Checkpoints are written by all processes together (orbax; the
workdir must be a filesystem they share) and hold global arrays, so a run can
resume under any process count and mesh that divide the arrays: orbax
reshards onto the new layout.

    jax.distributed.initialize("host0:1234", num_processes=2, process_id=i)
    out = train(loss_fn, params, opt, batch_fn, steps=1000, workdir=shared,
                checkpoint_every=100, mesh=process_mesh(model=2),
                param_sharding=shard_last_dim(process_mesh(model=2)))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding

from compressjax.core.errors import CompressionError
from compressjax.core.tree import path_str

__all__ = ["TrainState", "TrainResult", "init_state", "train",
           "epoch_batches", "shard_last_dim", "process_mesh"]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; all of it is checkpointed.

  Attributes:
    step: int32 scalar, number of updates done.
    params: the trained (float) tree.
    opt_state: the optax state (opaque).
    rng: uint32 key data of the base key; step `s` uses `fold_in(key, s)`.
    extra: optional non-trained state updated by `loss_fn` (e.g. batch
      statistics); None when unused.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: Any = None


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final TrainState.
    history: the logged training lines (dicts, as in metrics.jsonl) of this
      call.
    evals: the eval lines (keys prefixed "eval/") of this call.
  """
  state: TrainState
  history: list[dict]
  evals: list[dict]

  @property
  def params(self) -> Any:
    return self.state.params


def init_state(params: Any, optimizer: optax.GradientTransformation, *,
               seed: int = 0, extra: Any = None) -> TrainState:
  """A fresh (unplaced) TrainState at step 0."""
  _check_float(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    extra=extra)


def epoch_batches(data: Any, batch_size: int, seed: int = 0) -> Callable:
  """A `batch_fn` over in-memory arrays: shuffled epochs, remainder dropped.

  Args:
    data: a pytree of numpy arrays sharing the leading (example) dimension.
    batch_size: examples per batch.
    seed: the shuffling seed; epoch `e` is permuted by
      `np.random.default_rng([seed, e])`, so the batch of a step depends on
      (seed, step) only.

  Returns:
    `batch_fn(step) -> pytree of numpy arrays` with leading dim `batch_size`.
  """
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError("epoch_batches: data has no arrays")
  n = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(n) != 1 or None in n:
    raise ValueError("epoch_batches: every array in data needs the same "
                     f"leading (example) dimension, got {sorted(map(str, n))}")
  n = n.pop()
  if not 0 < batch_size <= n:
    raise ValueError(f"epoch_batches: batch_size={batch_size} must be in "
                     f"[1, {n}] (the number of examples)")
  data = jax.tree.map(np.asarray, data)
  per_epoch = n // batch_size
  cache: dict[int, np.ndarray] = {}

  def batch_fn(step: int) -> Any:
    epoch, i = divmod(int(step), per_epoch)
    if epoch not in cache:
      # one permutation kept: steps are visited in order
      cache.clear()
      cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    idx = cache[epoch][i * batch_size:(i + 1) * batch_size]
    return jax.tree.map(lambda x: x[idx], data)

  return batch_fn


def shard_last_dim(mesh: Mesh, axis: str = "model",
                   min_ndim: int = 2) -> Callable:
  """A `param_sharding` callable: the last dim of every leaf with
  `ndim >= min_ndim` over mesh `axis` when divisible, else replicated."""
  if axis not in mesh.axis_names:
    raise ValueError(f"shard_last_dim: mesh has no axis {axis!r} "
                     f"(axes {mesh.axis_names})")
  size = mesh.shape[axis]

  def spec(path, leaf) -> P:
    del path
    if np.ndim(leaf) >= min_ndim and np.shape(leaf)[-1] % size == 0:
      return P(*([None] * (np.ndim(leaf) - 1)), axis)
    return P()

  return spec


def process_mesh(model: int = 1, axes: tuple[str, str] = ("data", "model")
                 ) -> Mesh:
  """A (data, model) mesh over the devices of every process: `model`
  devices of one process per model group, the data axis over the rest (so
  across processes). With one process it is just the local devices."""
  local = jax.local_device_count()
  if model < 1 or local % model:
    raise CompressionError(
        f"process_mesh(model={model}): the model axis must divide the "
        f"{local} local devices of each process (model sharding stays "
        "within a process); use a divisor of "
        f"{local}")
  devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devs).reshape(len(devs) // model, model), axes)


# ---------------------------------------------------------------- checks


def _check_processes(mesh: Mesh | None) -> None:
  """Multi-process layout: the data axis over processes, the rest within."""
  n = jax.process_count()
  if n == 1:
    return
  if mesh is None:
    raise CompressionError(
        f"training under jax.distributed with {n} processes needs mesh= "
        "over the devices of every process, e.g. loop.process_mesh(model=1)")
  procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
  axes = dict(zip(mesh.axis_names, mesh.devices.shape))
  if "data" not in mesh.axis_names:
    raise CompressionError(
        f"mesh axes {mesh.axis_names} have no 'data' axis to spread over the "
        f"{n} processes; name the data-parallel axis 'data'")
  missing = sorted(set(range(n)) - set(procs.ravel().tolist()))
  if missing:
    raise CompressionError(
        f"mesh {axes} has no device of process(es) {missing}; every one of "
        f"the {n} processes must hold part of it (loop.process_mesh does)")
  if axes["data"] % n:
    raise CompressionError(
        f"process count {n} does not divide the mesh's data axis of size "
        f"{axes['data']} (mesh {axes}); use a data axis that is a multiple "
        f"of {n}, e.g. loop.process_mesh(model=...)")
  rows = np.moveaxis(procs, mesh.axis_names.index("data"), 0)
  rows = rows.reshape(axes["data"], -1)
  if (rows != rows[:, :1]).any() or len(
      set(np.unique(rows[:, 0], return_counts=True)[1].tolist())) != 1:
    raise CompressionError(
        f"mesh {axes} puts devices of several processes on one data index "
        "(or gives processes unequal shares); the non-data axes (model "
        "sharding) must stay within a process: build it with "
        "loop.process_mesh(model=...)")



def _check_float(params: Any) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      raise ValueError(
          f"params leaf '{path_str(path)}' has dtype {jnp.result_type(x)}; "
          "only floating-point leaves can be trained. Pass the float part "
          "(flo, rest = compressjax.partition_float(tree)) as params and "
          "rebuild the tree in loss_fn with compressjax.combine(flo, rest).")


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, (P, Sharding))


def _named(mesh: Mesh, s: Any, what: str) -> Sharding:
  if isinstance(s, Sharding):
    return s
  if s is None:
    return NamedSharding(mesh, P())
  if isinstance(s, P):
    return NamedSharding(mesh, s)
  raise ValueError(f"{what}: expected a PartitionSpec or Sharding, got "
                   f"{type(s).__name__}")


def _resolve(mesh: Mesh, spec: Any, tree: Any, what: str) -> Any:
  """Sharding per leaf of `tree` from a spec, a spec pytree (prefix) or a
  `(path, leaf) -> spec` callable."""
  if callable(spec) and not _is_spec(spec):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _named(mesh, spec(p, x), what), tree)
  try:
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda _: _named(mesh, s, what), sub),
        spec, tree, is_leaf=_is_spec)
  except ValueError as e:
    if what in str(e):
      raise
    raise ValueError(f"{what} does not match the tree structure: "
                     f"{e}") from None


def _opt_shardings(opt_abstract: Any, params: Any, p_sh: Any,
                   mesh: Mesh) -> Any:
  """Optax states mirror the params: subtrees with the params' structure get
  the params' shardings leafwise (where shapes agree), other leaves whose
  shape belongs to params of one sharding only get that, the rest is
  replicated."""
  rep = NamedSharding(mesh, P())
  ptree = jax.tree.structure(params)
  by_shape: dict = {}
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_sh)):
    by_shape.setdefault(tuple(np.shape(x)), set()).add(s)

  def like_params(sub):
    if jax.tree.structure(sub) == ptree:
      return jax.tree.map(
          lambda a, x, s: s if tuple(a.shape) == tuple(np.shape(x)) else rep,
          sub, params, p_sh)
    shard = by_shape.get(tuple(sub.shape), ())
    return next(iter(shard)) if len(shard) == 1 else rep

  return jax.tree.map(
      like_params, opt_abstract,
      is_leaf=lambda x: jax.tree.structure(x) == ptree)


def _batch_shardings(batch: Any, mesh: Mesh, batch_sharding: Any) -> Any:
  if batch_sharding is None:
    if "data" not in mesh.axis_names:
      raise ValueError(
          f"mesh axes {mesh.axis_names} have no 'data' axis for the default "
          "batch sharding; name the data-parallel axis 'data' or pass "
          "batch_sharding=")
    batch_sharding = lambda p, x: P("data") if np.ndim(x) else P()
  shs = _resolve(mesh, batch_sharding, batch, "batch_sharding")
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(batch),
                          jax.tree.leaves(shs)):
    spec = getattr(s, "spec", ())
    for d, names in enumerate(spec):
      if names is None or d >= np.ndim(x):
        continue
      names = names if isinstance(names, tuple) else (names,)
      size = math.prod(mesh.shape[a] for a in names)
      if np.shape(x)[d] % size:
        n = np.shape(x)[d]
        raise ValueError(
            f"batch leaf '{path_str(path)}' has shape {np.shape(x)}: dim {d} "
            f"({n}) is not divisible by mesh axis {'x'.join(names)} of size "
            f"{size}; use a batch size that is a multiple of {size} (e.g. "
            f"{-(-n // size) * size}) or pass batch_sharding=")
  return shs


# ---------------------------------------------------------------- step


def _make_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
               has_extra: bool) -> Callable:

  def step(state: TrainState, batch: Any):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def f(params):
      if has_extra:
        out = loss_fn(params, batch, rng, state.extra)
        loss, (metrics, extra) = out
      else:
        out = loss_fn(params, batch, rng)
        # a bare loss is accepted: no metrics
        loss, metrics = out if isinstance(out, tuple) else (out, None)
        extra = None
      return loss, (metrics or {}, extra)

    (loss, (metrics, extra)), grads = jax.value_and_grad(
        f, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params,
                        opt_state=opt_state, extra=extra)
    return new, {"loss": loss, **{k: v for k, v in metrics.items()
                                  if k != "loss"}}

  return step


# ---------------------------------------------------------------- logging


def _step_of(line: str) -> float:
  try:
    return json.loads(line).get("step", 0)
  except (ValueError, AttributeError):
    return math.inf  # a line cut by a kill: dropped


class _Logger:
  """metrics.jsonl + TensorBoard + progress lines."""

  def __init__(self, workdir, tensorboard, progress, start_step):
    self.jsonl = self.tb = None
    self.say = (progress if callable(progress)
                else (lambda s: print(s, flush=True)) if progress else None)
    if workdir is None:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    # lines after the starting step came from a killed run that is redone
    if os.path.exists(path):
      with open(path) as f:
        keep = [l for l in f if _step_of(l) <= start_step]
      with open(path, "w") as f:
        f.writelines(keep)
    self.jsonl = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # lazy: optional dependency
      # purge_step drops events of a killed run past the resumed step
      self.tb = SummaryWriter(os.path.join(workdir, "tb"),
                              purge_step=start_step + 1)

  def write(self, step: int, values: dict, seconds: float) -> dict:
    line = {"step": step, **values, "seconds": round(seconds, 3)}
    if self.jsonl is not None:
      self.jsonl.write(json.dumps(line) + "\n")
      self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)
      self.tb.flush()
    return line

  def close(self):
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def _scalars(d: dict, what: str) -> dict:
  out = {}
  for k, v in jax.device_get(d).items():
    if np.ndim(v) != 0:
      raise ValueError(f"{what} '{k}' has shape {np.shape(v)}; logged "
                       "metrics must be scalars (reduce them in the function)")
    out[k] = np.asarray(v).item()
  return out


def _fmt(d: dict) -> str:
  return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in d.items())


# ---------------------------------------------------------------- train


def _buffers(x: Any) -> set:
  if not isinstance(x, jax.Array):
    return set()
  return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}


def _fresh(x: Any, sharding: Sharding) -> jax.Array:
  """`x` placed on `sharding`, strongly typed, in buffers of its own.

  device_put may reuse a source buffer for one shard even with
  may_alias=False; donating that would delete the caller's array. Weak types
  (from Python scalars) would differ from a restored checkpoint's."""
  if not sharding.is_fully_addressable:
    return _global(x, sharding)
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  y = jax.device_put(x, sharding, may_alias=False)
  if _buffers(x) & _buffers(y):
    y = jnp.copy(y)
  if y.weak_type:
    y = y.astype(y.dtype)
  return y


def _global(x: Any, sharding: Sharding) -> jax.Array:
  """A global array on a multi-process `sharding` from `x`, a host value
  every process holds alike (or an array already global): each process
  places only its own shards, in new buffers."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    y = jax.jit(jnp.copy, out_shardings=sharding)(x)
  else:
    x = np.asarray(x)
    y = jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
  return y.astype(y.dtype) if y.weak_type else y


def _layout(params: Any, opt_abs: Any, extra: Any, mesh: Mesh | None,
            param_sharding: Any) -> TrainState:
  """The sharding of every TrainState leaf."""
  if mesh is None:
    # one device: where the params already are, else the default one
    devs = {d for x in jax.tree.leaves(params) if isinstance(x, jax.Array)
            for d in x.devices()}
    rep = jax.sharding.SingleDeviceSharding(
        devs.pop() if len(devs) == 1 else jax.devices()[0])
    p_sh = jax.tree.map(lambda _: rep, params)
    o_sh = jax.tree.map(lambda _: rep, opt_abs)
  else:
    rep = NamedSharding(mesh, P())
    if param_sharding is None:
      # leaves already placed on this mesh keep their layout
      param_sharding = lambda p, x: (
          x.sharding if isinstance(getattr(x, "sharding", None),
                                   NamedSharding)
          and x.sharding.mesh == mesh else P())
    p_sh = _resolve(mesh, param_sharding, params, "param_sharding")
    o_sh = _opt_shardings(opt_abs, params, p_sh, mesh)
  return TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep,
                    extra=jax.tree.map(lambda _: rep, extra))


def _abstract(params: Any, opt_abs: Any, extra: Any,
              st_sh: TrainState) -> TrainState:
  """Shapes, dtypes and shardings of the state: the restore target."""
  shapes = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=jax.eval_shape(lambda t: t, params), opt_state=opt_abs,
      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
      extra=jax.eval_shape(lambda t: t, extra))
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes, st_sh)


def _placed_state(params: Any, optimizer: optax.GradientTransformation,
                  seed: int, extra: Any, state: TrainState | None,
                  st_sh: TrainState) -> TrainState:
  """The starting state on its devices; every leaf a new buffer (the step
  donates the state, the caller keeps its arrays)."""
  put = lambda t, sh: jax.tree.map(_fresh, t, sh)
  params = put(params, st_sh.params)
  if state is not None:
    opt_state = put(state.opt_state, st_sh.opt_state)
    step, rng = state.step, state.rng
  else:
    # built in place (sharded), never whole on one device
    opt_state = jax.jit(optimizer.init, out_shardings=st_sh.opt_state)(params)
    step = np.zeros((), np.int32)
    rng = jax.random.key_data(jax.random.key(seed))
  state = TrainState(step=_fresh(step, st_sh.step), params=params,
                     opt_state=opt_state, rng=_fresh(rng, st_sh.rng),
                     extra=put(extra, st_sh.extra))
  # an optimizer state holding the params themselves (were jit to forward
  # them) would alias a buffer twice in the donated state
  seen: set = set()

  def unique(x):
    bufs = _buffers(x)
    if bufs & seen:
      return jnp.copy(x)
    seen.update(bufs)
    return x

  return jax.tree.map(unique, state)


def train(loss_fn: Callable, params: Any,
          optimizer: optax.GradientTransformation, batch_fn: Callable, *,
          steps: int, seed: int = 0, workdir: str | None = None,
          checkpoint_every: int | None = None, keep: int = 2,
          eval_fn: Callable | None = None, eval_every: int | None = None,
          log_every: int | None = 50, mesh: Mesh | None = None,
          param_sharding: Any = None, batch_sharding: Any = None,
          tensorboard: bool = True, progress: bool | Callable = True,
          extra: Any = None, state: TrainState | None = None) -> TrainResult:
  """Trains `params` with `optimizer` on `loss_fn` until step `steps`.

  Args:
    loss_fn: `(params, batch, rng) -> (loss, metrics)` (see module doc).
    params: the float tree to train (None when `state` is given).
    optimizer: an optax GradientTransformation.
    batch_fn: `step -> batch`, a pure function of the step.
    steps: the total number of steps; a resumed run continues to it. At or
      below a checkpoint's step, the checkpoint is just loaded and returned.
    seed: seeds the per-step rng.
    workdir: where metrics, TensorBoard events and checkpoints go. If it
      holds checkpoints, training resumes from the latest.
    checkpoint_every: save a checkpoint every this many steps and at the end
      (needs workdir).
    keep: checkpoints kept.
    eval_fn: `params -> dict of scalars`, run every `eval_every` steps and at
      the end, logged as "eval/<key>".
    eval_every: see eval_fn.
    log_every: log the step's loss and metrics every this many steps and at
      the end (None: at the end only).
    mesh: a device mesh for data/model parallelism.
    param_sharding: with `mesh`: a PartitionSpec / Sharding, a pytree of them
      (prefix of params), or `(path, leaf) -> PartitionSpec` (see
      `shard_last_dim`). Default: leaves already NamedSharding-placed on
      `mesh` keep their layout, the rest is replicated. The optimizer state
      follows the params.
    batch_sharding: with `mesh`: as param_sharding, for the batch. Default:
      leading dim over the mesh's "data" axis.
    tensorboard: write TensorBoard scalars to workdir/tb (needs tensorboardX).
    progress: print one line per log; a callable receives the lines instead.
    extra: non-trained state passed to and returned by loss_fn (see module
      doc); replicated under a mesh.
    state: start from this TrainState instead of `params` (it is copied, not
      consumed).

  Returns:
    TrainResult(state, history, evals).
  """
  # ---- argument checks, before any work
  if steps < 0:
    raise ValueError(f"steps={steps} must be >= 0")
  if checkpoint_every is not None:
    if workdir is None:
      raise ValueError("checkpoint_every needs workdir= (where checkpoints "
                       "are written)")
    if checkpoint_every < 1:
      raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1")
  if keep < 1:
    raise ValueError(f"keep={keep} must be >= 1")
  if eval_every is not None:
    if eval_fn is None:
      raise ValueError("eval_every needs eval_fn=")
    if eval_every < 1:
      raise ValueError(f"eval_every={eval_every} must be >= 1")
  if log_every is not None and log_every < 1:
    raise ValueError(f"log_every={log_every} must be >= 1 (or None)")
  if mesh is None and (param_sharding is not None or
                       batch_sharding is not None):
    raise ValueError("param_sharding / batch_sharding need mesh=")
  if (state is None) == (params is None):
    raise ValueError("pass exactly one of params and state=")
  if state is not None and extra is not None:
    raise ValueError("extra= with state=: put it in state.extra")
  if workdir is not None and tensorboard:
    try:
      import tensorboardX  # noqa: F401
    except ImportError:
      raise ImportError("tensorboard=True needs tensorboardX (pip install "
                        "tensorboardX), or pass tensorboard=False") from None

  _check_processes(mesh)
  if state is not None:
    params, extra = state.params, state.extra
  _check_float(params)
  opt_abs = (jax.eval_shape(lambda t: t, state.opt_state)
             if state is not None else jax.eval_shape(optimizer.init, params))
  st_sh = _layout(params, opt_abs, extra, mesh, param_sharding)

  # ---- resume, else a fresh state
  mngr = None
  ckpt_dir = (os.path.abspath(os.path.join(workdir, "checkpoints"))
              if workdir is not None else None)
  if ckpt_dir is not None and (checkpoint_every is not None or
                               os.path.isdir(ckpt_dir)):
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True))
  try:
    latest = mngr.latest_step() if mngr is not None else None
    if latest is not None:
      # restored onto the fresh state's exact layout: same dtypes, shardings
      target = _abstract(params, opt_abs, extra, st_sh)
      try:
        state = mngr.restore(latest, args=ocp.args.StandardRestore(target))
      except Exception as e:  # noqa: BLE001 - orbax raises many kinds
        raise ValueError(
            f"checkpoint {latest} in {ckpt_dir} does not match the state "
            "being trained (did the params, optimizer or extra change?); use "
            f"a new workdir or delete the checkpoints. Cause: {e}") from e
    else:
      state = _placed_state(params, optimizer, seed, extra, state, st_sh)
    return _run(loss_fn, optimizer, batch_fn, state, st_sh, steps=steps,
                workdir=workdir, mngr=mngr, checkpoint_every=checkpoint_every,
                eval_fn=eval_fn, eval_every=eval_every, log_every=log_every,
                mesh=mesh, batch_sharding=batch_sharding,
                tensorboard=tensorboard, progress=progress)
  finally:
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()


def _run(loss_fn, optimizer, batch_fn, state, st_sh, *, steps, workdir, mngr,
         checkpoint_every, eval_fn, eval_every, log_every, mesh,
         batch_sharding, tensorboard, progress) -> TrainResult:
  start = int(state.step)
  history: list[dict] = []
  evals: list[dict] = []
  if start >= steps:
    return TrainResult(state, history, evals)

  step_fn = _make_step(loss_fn, optimizer, state.extra is not None)
  # out_shardings pin the state's layout (and so a checkpoint's) per step
  jitted = jax.jit(step_fn, donate_argnums=0,
                   out_shardings=(st_sh, st_sh.step))
  # one writer: process 0 (the others compute the same lines)
  primary = jax.process_index() == 0
  log = _Logger(workdir if primary else None, tensorboard, progress if primary
                else False, start)
  if start and log.say:
    log.say(f"resumed at step {start}/{steps}")
  t0 = last_t = time.perf_counter()
  last_step = start
  try:
    for s in range(start, steps):
      batch = batch_fn(s)
      if mesh is not None:
        shs = _batch_shardings(batch, mesh, batch_sharding)
        batch = (jax.device_put(batch, shs) if jax.process_count() == 1
                 else jax.tree.map(_global, batch, shs))
      state, metrics = jitted(state, batch)
      done = s + 1
      if done == start + 1:
        # shapes are known without waiting for the step
        for k, v in metrics.items():
          if np.ndim(v) != 0:
            raise ValueError(f"loss_fn metric '{k}' has shape {np.shape(v)}; "
                             "metrics must be scalars")
      if (log_every is not None and done % log_every == 0) or done == steps:
        vals = _scalars(metrics, "loss_fn metric")
        now = time.perf_counter()
        rate = (done - last_step) / max(now - last_t, 1e-9)
        last_t, last_step = now, done
        history.append(log.write(done, vals, now - t0))
        if log.say:
          log.say(f"step {done}/{steps} {_fmt(vals)}  {rate:.1f} it/s")
      if eval_fn is not None and (
          (eval_every is not None and done % eval_every == 0)
          or done == steps):
        out = eval_fn(state.params)
        if not isinstance(out, dict):
          raise ValueError("eval_fn must return a dict of scalars, got "
                           f"{type(out).__name__}")
        vals = {f"eval/{k}": v
                for k, v in _scalars(out, "eval_fn value").items()}
        evals.append(log.write(done, vals, time.perf_counter() - t0))
        if log.say:
          log.say(f"step {done}/{steps} {_fmt(vals)}")
      if mngr is not None and checkpoint_every is not None and (
          done % checkpoint_every == 0 or done == steps):
        mngr.save(done, args=ocp.args.StandardSave(state))
  finally:
    log.close()
  return TrainResult(state, history, evals)
