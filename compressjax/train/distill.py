"""Knowledge distillation: a frozen teacher trains a (smaller or compressed)
student.

  kd_loss         Hinton et al. 2015, "Distilling the Knowledge in a Neural
                  Network": L = a*T^2*KL(softmax(z_t/T) || softmax(z_s/T))
                  + (1 - a)*CE(y, z_s); the T^2 keeps the soft term's gradient
                  scale independent of T.
  hidden_loss     Jiao et al. 2020, "TinyBERT" (Eq. 8: MSE(H_s W_h, H_t) with a
                  learnable W_h, layer mapping n = g(m) = m*k) or Sanh et al.
                  2019, "DistilBERT" (cosine loss between hidden states).
  attention_loss  TinyBERT Eq. 7: MSE between attention maps of mapped layers.
  sample_sequences, sequence_kd_batches
                  Kim & Rush 2016, "Sequence-Level Knowledge Distillation":
                  train the student on the teacher's own generations.

`distill_loss_fn` combines them into `loss_fn(trainable, batch, rng) ->
(loss, metrics)` for a generic training loop, with

    trainable = {"student": student_variables, "proj": projections}

("proj" from `init_projections`, only needed with hidden_weight > 0 and
differing widths). The teacher is closed over and gradient-stopped.

Compressed models. `compressjax.run` forwards `mutable=` to `model.apply`, so
`intermediates` captures hidden states and attention maps of a compressed
tree (quantized, sparse, low-rank) without materializing it. A compressed
teacher is passed as is. For a compressed student, differentiate only its
float leaves (scales, factors, values): split the tree with
`cj.partition_float` and close over the rest,

    flo, rest = cj.partition_float(student_tree)
    run = lambda p, x: intermediates(model, cj.combine(p, rest), x)
    loss_fn = distill_loss_fn(teacher, t_vars, student_run=run, ...)
    trainable = {"student": flo, "proj": ...}

QAT students (fake-quant in the forward pass) likewise pass their own
`student_run(params, x) -> logits | (logits, hiddens, attns)`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax.core.tree import is_compressed

Array = jax.Array
LayerMap = Sequence[int] | Mapping[int, int] | None


# --- losses -----------------------------------------------------------------

def _masked_mean(x, mask):
  """Mean of per-token values `x`, weighted by `mask` (same leading shape)."""
  if mask is None:
    return jnp.mean(x)
  m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1e-9)


def kd_terms(student_logits, teacher_logits, labels=None, *,
             temperature: float = 2.0, mask=None) -> tuple[Array, Array]:
  """(KL(p_t^T || p_s^T), CE(y, z_s)) as token means, float32, unscaled.

  CE is 0 when labels is None. The teacher is not gradient-stopped here.
  """
  t = jnp.float32(temperature)
  zs = student_logits.astype(jnp.float32)
  zt = teacher_logits.astype(jnp.float32)
  log_ps = jax.nn.log_softmax(zs / t, axis=-1)
  log_pt = jax.nn.log_softmax(zt / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  kl = _masked_mean(kl, mask)
  if labels is None:
    return kl, jnp.zeros((), jnp.float32)
  logp = jax.nn.log_softmax(zs, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]
  return kl, _masked_mean(nll, mask)


def kd_loss(student_logits, teacher_logits, labels=None, *,
            temperature: float = 2.0, alpha: float = 0.5, mask=None) -> Array:
  """Hinton et al. 2015: a*T^2*KL(softmax(z_t/T) || softmax(z_s/T)) +
  (1 - a)*CE(y, z_s), mean over tokens (weighted by `mask` if given).

  Logits (..., V), labels (...) int. Without labels there is no hard term and
  the loss is T^2*KL (a only mixes the two terms). d/dz_s of the soft term is
  a*T*(softmax(z_s/T) - softmax(z_t/T))/N.
  """
  kl, ce = kd_terms(student_logits, teacher_logits, labels,
                    temperature=temperature, mask=mask)
  t2 = jnp.float32(temperature) ** 2
  if labels is None:
    return t2 * kl
  return alpha * t2 * kl + (1.0 - alpha) * ce


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
  """TinyBERT's uniform mapping g(m) = m*k (1-indexed layers, k = N/M) as
  0-indexed block outputs: student block i <-> teacher block (i+1)*k - 1, so
  the last blocks pair up. Rounds when N is not a multiple of M."""
  if n_student < 1 or n_teacher < 1:
    raise ValueError(f"layer counts must be positive, got {n_student} "
                     f"student / {n_teacher} teacher")
  return [max(round((i + 1) * n_teacher / n_student) - 1, 0)
          for i in range(n_student)]


def _pairs(layer_map: LayerMap, n_s: int, n_t: int) -> list[tuple[int, int]]:
  """(student layer, teacher layer) pairs; None means uniform."""
  if not (n_s and n_t):
    raise ValueError(f"nothing to match: {n_s} student / {n_t} teacher "
                     "layers captured (attention maps need TransformerLM's "
                     "attention='xla'; the Pallas kernel never forms them)")
  if layer_map is None:
    layer_map = uniform_layer_map(n_s, n_t)
  items = (sorted(layer_map.items()) if isinstance(layer_map, Mapping)
           else list(enumerate(layer_map)))
  for s, t in items:
    if not (0 <= s < n_s and 0 <= t < n_t):
      raise ValueError(f"layer_map pair ({s}, {t}) is out of range for "
                       f"{n_s} student / {n_t} teacher layers")
  return [(int(s), int(t)) for s, t in items]


def init_projections(key, student_dims: int | Sequence[int],
                     teacher_dims: int | Sequence[int],
                     layer_map: LayerMap = None, *,
                     identity: bool = False) -> dict:
  """TinyBERT's W_h: one linear map (student dim -> teacher dim) per mapped
  student layer, {"layer_{i}": {"kernel": (d_s, d_t), "bias": (d_t,)}}.

  Dims are per layer or one int for all (then layer_map must be given).
  Kernels ~ N(0, 1/d_s), biases 0; identity=True starts at eye(d_s, d_t)
  (the identity when widths match).
  """
  per_s, per_t = (not isinstance(d, int) for d in (student_dims,
                                                   teacher_dims))
  if layer_map is None and not (per_s and per_t):
    raise ValueError("give layer_map, or dims per layer to infer it")
  items = [] if layer_map is None else list(_as_items(layer_map))
  n_s = len(student_dims) if per_s else max(s for s, _ in items) + 1
  n_t = len(teacher_dims) if per_t else max(t for _, t in items) + 1
  ds = student_dims if per_s else [student_dims] * n_s
  dt = teacher_dims if per_t else [teacher_dims] * n_t
  pairs = _pairs(layer_map, n_s, n_t)
  out = {}
  for (s, t), k in zip(pairs, jax.random.split(key, len(pairs))):
    if identity:
      w = jnp.eye(ds[s], dt[t], dtype=jnp.float32)
    else:
      w = jax.random.normal(k, (ds[s], dt[t]), jnp.float32) / ds[s] ** 0.5
    out[f"layer_{s}"] = {"kernel": w, "bias": jnp.zeros((dt[t],),
                                                        jnp.float32)}
  return out


def _as_items(layer_map):
  return (layer_map.items() if isinstance(layer_map, Mapping)
          else enumerate(layer_map))


def _project(h, proj):
  if proj is None:
    return h
  return h @ proj["kernel"].astype(jnp.float32) + proj["bias"].astype(
      jnp.float32)


def hidden_loss(student_hiddens: Sequence[Array],
                teacher_hiddens: Sequence[Array], projections=None,
                layer_map: LayerMap = None, kind: str = "mse",
                mask=None) -> Array:
  """Hidden-state matching, mean over mapped layers.

  kind="mse": TinyBERT Eq. 8, mean over tokens and features of
  (h_s W + b - h_t)^2; kind="cosine": DistilBERT, mean over tokens of
  1 - cos(h_s W + b, h_t). `projections` from `init_projections` (None: no
  projection, widths must match). Hiddens (B, T, d); mask (B, T). TinyBERT
  sums over layers; we average so the weight does not grow with depth.
  """
  if kind not in ("mse", "cosine"):
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
  pairs = _pairs(layer_map, len(student_hiddens), len(teacher_hiddens))
  losses = []
  for s, t in pairs:
    hs = _project(student_hiddens[s].astype(jnp.float32),
                  None if projections is None else projections[f"layer_{s}"])
    ht = teacher_hiddens[t].astype(jnp.float32)
    if kind == "mse":
      per_tok = jnp.mean((hs - ht) ** 2, axis=-1)
    else:
      eps = jnp.float32(1e-8)
      cos = jnp.sum(hs * ht, -1) / (
          jnp.maximum(jnp.linalg.norm(hs, axis=-1), eps)
          * jnp.maximum(jnp.linalg.norm(ht, axis=-1), eps))
      per_tok = 1.0 - cos
    losses.append(_masked_mean(per_tok, mask))
  return jnp.mean(jnp.stack(losses))


def attention_loss(student_attn: Sequence[Array], teacher_attn: Sequence[Array],
                   layer_map: LayerMap = None, kind: str = "mse",
                   mask=None) -> Array:
  """Attention-map matching (TinyBERT Eq. 7), mean over mapped layers.

  Maps are probabilities (B, H, Tq, Tk). kind="mse": mean over heads, query
  rows and keys of (A_s - A_t)^2 (causally masked entries are 0 on both
  sides); kind="kl": mean over heads and rows of KL(A_t || A_s). When head
  counts differ, both sides are averaged over heads first (a head-agnostic
  map; heads have no correspondence across models of different width).
  TinyBERT matches pre-softmax scores; probabilities avoid the -inf masked
  scores and are what `intermediates` records. `mask` (B, Tq) weights rows.
  """
  if kind not in ("mse", "kl"):
    raise ValueError(f"kind must be 'mse' or 'kl', got {kind!r}")
  pairs = _pairs(layer_map, len(student_attn), len(teacher_attn))
  losses = []
  for s, t in pairs:
    a_s = student_attn[s].astype(jnp.float32)
    a_t = teacher_attn[t].astype(jnp.float32)
    if a_s.shape[1] != a_t.shape[1]:
      a_s = jnp.mean(a_s, axis=1, keepdims=True)
      a_t = jnp.mean(a_t, axis=1, keepdims=True)
    if kind == "mse":
      per_row = jnp.mean((a_s - a_t) ** 2, axis=-1)
    else:
      tiny = jnp.finfo(jnp.float32).tiny
      per_row = jnp.sum(jnp.where(
          a_t > 0, a_t * (jnp.log(jnp.maximum(a_t, tiny))
                          - jnp.log(jnp.maximum(a_s, tiny))), 0.0), axis=-1)
    per_row = jnp.mean(per_row, axis=1)  # over heads -> (B, Tq)
    losses.append(_masked_mean(per_row, mask))
  return jnp.mean(jnp.stack(losses))


# --- capturing intermediates ------------------------------------------------

def _has_compressed(tree) -> bool:
  return any(is_compressed(x)
             for x in jax.tree.leaves(tree, is_leaf=is_compressed))


def _apply(model, params, x, **kw):
  """model.apply, or compressjax.run when the tree holds compressed leaves
  (run forwards mutable= to model.apply)."""
  if _has_compressed(params):
    from compressjax.runtime.interpret import run  # no import cycle
    return run(model, params, x, **kw)
  return model.apply(params, x, **kw)


def _natural(path: tuple) -> tuple:
  # block_10 after block_9: sort numeric parts as numbers.
  return tuple(tuple(int(p) if p.isdigit() else p
                     for p in re.split(r"(\d+)", k)) for k in path)


def _collect(tree, name: str) -> list[Array]:
  """Sown values named `name` (last key), in natural path order."""
  found = []

  def walk(node, path):
    if isinstance(node, Mapping):
      for k, v in node.items():
        if k == name and isinstance(v, tuple):
          found.extend((path + (str(k), str(j)), a) for j, a in enumerate(v))
        else:
          walk(v, path + (str(k),))
  walk(tree, ())
  return [a for _, a in sorted(found, key=lambda e: _natural(e[0]))]


def intermediates(model: nn.Module, params, x, **kwargs
                  ) -> tuple[Array, list[Array], list[Array]]:
  """(logits, hiddens, attns) of a linen model that sows "hidden" and "attn"
  into "intermediates" (TransformerLM: each block's output (B, T, d) and
  attention probabilities (B, H, T, T)). Compressed trees go through
  `compressjax.run`."""
  logits, state = _apply(model, params, x, mutable=["intermediates"],
                         **kwargs)
  inter = state.get("intermediates", {})
  return logits, _collect(inter, "hidden"), _collect(inter, "attn")


def _forward(model, params, x, full: bool):
  """Linen module -> logits or intermediates; a callable is called as is."""
  if isinstance(model, nn.Module):
    return intermediates(model, params, x) if full else _apply(
        model, params, x)
  return model(params, x)


def _split_out(out, what: str, need: bool):
  if isinstance(out, (tuple, list)):
    logits, hiddens, attns = out
    return logits, list(hiddens), list(attns)
  if need:
    raise ValueError(f"{what} returned only logits, but hidden_weight or "
                     "attn_weight needs (logits, hiddens, attns)")
  return out, [], []


# --- the training objective -------------------------------------------------

def _tokens(batch):
  if isinstance(batch, Mapping):
    return batch["tokens"], batch.get("mask")
  return batch, None


def distill_loss_fn(teacher_model: Any, teacher_params: Any,
                    student_model: Any = None, *, temperature: float = 2.0,
                    alpha: float = 0.5, hidden_weight: float = 0.0,
                    attn_weight: float = 0.0, layer_map: LayerMap = None,
                    hidden_kind: str = "mse", attn_kind: str = "mse",
                    student_run: Callable | None = None
                    ) -> Callable[[Any, Any, Any], tuple[Array, dict]]:
  """`loss_fn(trainable, batch, rng) -> (loss, metrics)` for a byte LM.

  loss = kd_loss(z_s, z_t, y; T, alpha) + hidden_weight*hidden_loss
         + attn_weight*attention_loss.
  trainable: {"student": params, "proj": init_projections(...) (optional)}.
  batch: int tokens (B, L+1), x = batch[:, :-1], y = batch[:, 1:]; or
  {"tokens": ..., "mask": (B, L) over targets, or (B, L+1) per token}.
  Models are linen modules (compressed trees run through compressjax.run)
  or functions `f(params, x) -> logits | (logits, hiddens, attns)`;
  `student_run` overrides `student_model`. The teacher (closed over, so a jit constant) is
  gradient-stopped. rng is unused (the model has no dropout).
  """
  full = hidden_weight != 0 or attn_weight != 0
  if student_run is None:
    if student_model is None:
      raise ValueError("give student_model or student_run")
    student_run = lambda p, x: _forward(student_model, p, x, full)

  def loss_fn(trainable, batch, rng):
    del rng
    tokens, mask = _tokens(batch)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if mask is not None and mask.shape[-1] == tokens.shape[-1]:
      mask = mask[:, 1:]  # a per-token mask: keep the targets' part
    t_logits, t_h, t_a = _split_out(
        _forward(teacher_model, teacher_params, x, full), "the teacher", full)
    t_logits, t_h, t_a = jax.lax.stop_gradient((t_logits, t_h, t_a))
    s_logits, s_h, s_a = _split_out(
        student_run(trainable["student"], x), "student_run", full)
    kl, ce = kd_terms(s_logits, t_logits, y, temperature=temperature,
                      mask=mask)
    t2 = jnp.float32(temperature) ** 2
    loss = alpha * t2 * kl + (1.0 - alpha) * ce
    metrics = {"kl": kl, "ce": ce}
    if hidden_weight:
      hl = hidden_loss(s_h, t_h, trainable.get("proj"), layer_map,
                       hidden_kind, mask)
      loss = loss + hidden_weight * hl
      metrics["hidden"] = hl
    if attn_weight:
      al = attention_loss(s_a, t_a, layer_map, attn_kind, mask)
      loss = loss + attn_weight * al
      metrics["attn"] = al
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


# --- sequence-level KD ------------------------------------------------------

def sample_sequences(model: Any, params: Any, key, prompts, length: int,
                     temperature: float = 1.0) -> Array:
  """Autoregressive samples (B, P + length) int32 continuing `prompts`
  (B, P), P >= 1; temperature 0 is greedy (Kim & Rush's beam search with
  beam 1). Each step recomputes the whole fixed-size buffer (no KV cache):
  causal attention makes the unwritten tail irrelevant. The model sees
  P + length - 1 tokens, which must fit its context. Deterministic in key.
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 2 or prompts.shape[1] < 1:
    raise ValueError(f"prompts must be (B, P) with P >= 1, got "
                     f"{prompts.shape}")
  return _sample(model, params, key, prompts, int(length), float(temperature))


@functools.partial(jax.jit, static_argnames=("model", "length",
                                             "temperature"))
def _sample(model, params, key, prompts, length, temperature):
  b, p = prompts.shape
  n = p + length
  buf = jnp.zeros((b, n), jnp.int32).at[:, :p].set(prompts)

  def step(i, buf):
    logits = _forward(model, params, buf[:, :-1], False)
    if isinstance(logits, (tuple, list)):  # a function returning intermediates
      logits = logits[0]
    z = jax.lax.dynamic_index_in_dim(logits, i - 1, axis=1,
                                     keepdims=False).astype(jnp.float32)
    if temperature == 0:
      tok = jnp.argmax(z, axis=-1)
    else:
      tok = jax.random.categorical(jax.random.fold_in(key, i),
                                   z / temperature, axis=-1)
    return buf.at[:, i].set(tok.astype(jnp.int32))

  return jax.lax.fori_loop(p, n, step, buf)


def sequence_kd_batches(teacher_model: Any, teacher_params: Any, key,
                        batches: Iterable[Any], *, prompt_len: int = 1,
                        temperature: float = 1.0) -> Iterator[Array]:
  """Kim & Rush 2016: for each data batch (B, L+1) (or {"tokens": ...}),
  yields a teacher sample of the same shape continuing its first
  `prompt_len` tokens. Train on them with `distill_loss_fn` (alpha=0: pure
  sequence-level KD, CE on teacher samples; alpha>0 adds word-level KD).
  Batch k uses fold_in(key, k)."""
  for k, batch in enumerate(batches):
    tokens, _ = _tokens(batch)
    tokens = jnp.asarray(tokens, jnp.int32)
    yield sample_sequences(teacher_model, teacher_params,
                           jax.random.fold_in(key, k),
                           tokens[:, :prompt_len],
                           tokens.shape[1] - prompt_len, temperature)
