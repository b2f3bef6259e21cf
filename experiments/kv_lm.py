r"""KV-cache compression experiment: quantized caches, eviction policies and
budgets, judged by perplexity, streaming, needle retrieval, speed and memory.

    python -m experiments.kv_lm --workdir=/tmp/cj_kv
    python -m experiments.kv_lm --workdir=/tmp/cj_kv --config.rows=float,h2o_25

Models (configs/kv.py):
  byte   the default byte LM (models.transformer, learned positions, seq_len
         128), the baseline of experiments.compress_lm, cached in the workdir.
  llama  a small RoPE Llama (models.llama, random init) trained here on the
         same stdlib bytes: windows of seq_len that start with a BOS byte
         (NUL, the corpus's document separator), a fraction of them with a
         planted needle "\n@@ <5 key symbols><5 value symbols>\n" (symbols:
         bytes 0xC0-0xFF, absent from the text, all distinct within a
         window's needles) repeated later, after a first phase of copying
         strings of distinct symbols with a varying period (where induction
         heads should form; see configs/kv.py for what was measured).
         Cached in <workdir>/baseline_kv/<key>.

Every row is a `kv.KVSpec` (quantized entries and / or an eviction policy
with a budget); the model's weights stay float. Per row and model:
  val_ppl     teacher-forced perplexity over validation windows of the
              training length, one token at a time through the compressed
              cache (each token attends only to what the policy kept);
  stream_ppl  (llama) teacher-forced perplexity over streams 4x the training
              length with a cache of `stream.budget` tokens (StreamingLLM's
              setting; positions within the cache for the sink policy);
              `stream_ppl_past` over the tokens past the training length;
  needle_acc  (llama) exact match of the needle's value, greedy, after a
              prompt of each context length with the needle at each depth;
  cache memory (true bytes of the cache at the full context), bits per
              cached element, and decode throughput at batch 1 and 16.
Results: results.json / results.md (the default experiment's fields plus
cache-specific ones) and results.png (quality vs cache size per policy).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from compressjax import kv
from compressjax.data import stdlib_text
from compressjax.models import llama, transformer
from experiments import harness, lm_task

Config = ml_collections.ConfigDict
Log = Callable[[str], None]

CACHE_VERSION = 4  # 4: copy phase in short windows, large batches
BOS = 0  # NUL: stdlib_text's document separator, never inside a file
NEEDLE_KEY_LEN = 5
NEEDLE_VALUE_LEN = 5


# ---------------------------------------------------------------------------
# Needles
# ---------------------------------------------------------------------------

# Needle symbols: bytes 0xC0..0xFF, which never occur in the (ASCII) stdlib
# text, so a symbol identifies its earlier occurrence by itself. (With ASCII
# letters and digits this model did not learn to retrieve: "\n@@ 48213 ->
# vfkqz" and "\n@@ qhtwb vfkqz" stayed at chance after 1200 steps; 2-grams
# such as " v" are everywhere in code.)
NEEDLE_ALPHABET = np.arange(0xC0, 0x100, dtype=np.uint8)


def needle(rng: np.random.Generator) -> tuple[bytes, bytes, bytes]:
  """(planted line, query, answer): "\n@@ " + 5 key symbols + 5 value
  symbols + "\n"; the query "\n@@ " + the key; the answer the value (the
  model finds the key's earlier occurrence and copies what follows it)."""
  return needle_lines(rng, 1)[0]


def needle_lines(rng: np.random.Generator, n: int
                 ) -> list[tuple[bytes, bytes, bytes]]:
  """n needles (see `needle`) whose 10 n symbols are all distinct, so each
  symbol's earlier occurrence names the byte that follows it (drawn with
  replacement, about half the needles repeated a symbol: then the byte
  after a symbol is ambiguous, and one-token induction cannot be exact)."""
  k, v = NEEDLE_KEY_LEN, NEEDLE_VALUE_LEN
  syms = rng.choice(NEEDLE_ALPHABET, n * (k + v), replace=False)
  out = []
  for i in range(n):
    key = syms[i * (k + v):i * (k + v) + k].tobytes()
    value = syms[i * (k + v) + k:(i + 1) * (k + v)].tobytes()
    out.append((b"\n@@ " + key + value + b"\n", b"\n@@ " + key, value))
  return out


def needle_prompt(filler: np.ndarray, rng: np.random.Generator, length: int,
                  depth: float) -> tuple[np.ndarray, np.ndarray]:
  """A prompt of exactly `length` tokens: BOS, filler bytes from a random
  offset with the needle at `depth` (0..1) of the filler, then the query;
  and the answer bytes."""
  line, query, answer = needle(rng)
  n = length - 1 - len(line) - len(query)
  if n < 1:
    raise ValueError(f"context {length} is too short for a needle")
  start = int(rng.integers(0, len(filler) - n))
  text = filler[start:start + n]
  at = int(round(depth * n))
  prompt = np.concatenate([[BOS], text[:at], np.frombuffer(line, np.uint8),
                           text[at:], np.frombuffer(query, np.uint8)])
  return prompt.astype(np.int32), np.frombuffer(answer, np.uint8).astype(
      np.int32)


def needle_teacher_forced(logits: np.ndarray, answers: np.ndarray
                          ) -> np.ndarray:
  """(N, value length) bool: whether each answer byte is the argmax of the
  logits (N, T, vocab) of prompt + answer (T = prompt + answer length)
  where it is predicted (the position before it)."""
  n = answers.shape[1]
  return np.argmax(logits[:, -n - 1:-1], axis=-1) == answers


def training_window(data: np.ndarray, rng: np.random.Generator, length: int,
                    needle_fraction: float) -> np.ndarray:
  """length + 1 tokens: BOS + text, or (with probability needle_fraction)
  BOS + text with 1-4 needle lines planted and then repeated later in a
  random order (each repeat's value can only be predicted by finding its
  key earlier: the retrieval skill, with up to 20 supervised bytes per
  window)."""
  if rng.random() >= needle_fraction:
    start = int(rng.integers(0, len(data) - length))
    return np.concatenate([[BOS], data[start:start + length]]).astype(
        np.int32)
  n = int(rng.integers(1, max(2, min(4, length // 64)) + 1))
  lines = [x[0] for x in needle_lines(rng, n)]
  lines += [lines[i] for i in rng.permutation(n)]
  fill = length - sum(len(x) for x in lines)
  cuts = np.sort(rng.integers(0, fill + 1, len(lines)))
  sizes = np.diff(np.concatenate([[0], cuts, [fill]]))
  start = int(rng.integers(0, len(data) - fill))
  text = data[start:start + fill]
  parts, at = [np.array([BOS])], 0
  for size, line in zip(sizes, lines + [b""]):
    parts += [text[at:at + size], np.frombuffer(line, np.uint8)]
    at += size
  return np.concatenate(parts).astype(np.int32)


def copy_window(rng: np.random.Generator, length: int) -> np.ndarray:
  """length + 1 tokens: BOS, then a string of 4-64 (at most length / 2)
  distinct needle symbols repeated: the task on which induction heads
  (Olsson et al. 2022) form, which text with sparse needles did not give.
  The period varies (a fixed
  one is solved by a head at a fixed relative position, which RoPE makes
  easy, and does not retrieve) and symbols do not repeat within it (else
  the byte after a symbol is ambiguous)."""
  h = int(rng.integers(4, min(len(NEEDLE_ALPHABET), length // 2) + 1))
  s = rng.choice(NEEDLE_ALPHABET, h, replace=False)
  w = np.concatenate([[BOS], np.tile(s, length // h + 1)])[:length + 1]
  return w.astype(np.int32)


# ---------------------------------------------------------------------------
# The RoPE Llama baseline
# ---------------------------------------------------------------------------

def llama_config(c: Config) -> llama.LlamaConfig:
  m = c.llama
  return llama.LlamaConfig(
      vocab_size=stdlib_text.VOCAB_SIZE, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers,
      num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads, rope_theta=m.rope_theta,
      max_position_embeddings=max(m.seq_len, c.stream.length))


def llama_key(c: Config, digest: str) -> str:
  blob = json.dumps(dict(version=CACHE_VERSION, seed=c.seed,
                         llama={k: v for k, v in c.llama.to_dict().items()
                                if k not in ("log_every", "windows")},
                         data=c.data.to_dict(), digest=digest),
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_llama(c: Config, model, train_data: np.ndarray, log: Log):
  """Trains the Llama from random init; returns ({'params'}, stats)."""
  m = c.llama
  variables = jax.jit(model.init)(jax.random.key(c.seed),
                                  jnp.zeros((1, m.seq_len), jnp.int32))
  params = variables["params"]
  opt = lm_task.optimizer(m)
  state = opt.init(params)

  @jax.jit
  def step(p, s, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch[:, :-1])
      return transformer.next_token_loss(logits, batch[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  rng = np.random.default_rng([c.seed, 11])
  n = sum(x.size for x in jax.tree.leaves(params))
  log(f"training the RoPE Llama: {n:,} params, {m.copy_steps} steps of "
      f"copying random strings ({m.copy_batch_size}x{m.copy_seq_len}), then "
      f"{m.steps - m.copy_steps} steps of text ({m.needle_fraction:.0%} of "
      f"text windows with needles, {m.copy_fraction:.0%} copy windows), "
      f"{m.batch_size}x{m.seq_len} bytes")
  probes = {}
  for ctx in (128, m.seq_len):
    p, a, _ = needle_prompts(c, train_data, ctx)
    probes[ctx] = (jnp.asarray(np.concatenate([p, a], axis=1)), a)
  probe_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  start, losses, first = time.time(), [], None
  for i in range(1, m.steps + 1):
    if i <= m.copy_steps:  # short windows, large batches: see configs/kv.py
      batch = np.stack([copy_window(rng, m.copy_seq_len)
                        for _ in range(m.copy_batch_size)])
    else:
      batch = np.stack([copy_window(rng, m.seq_len)
                        if rng.random() < m.copy_fraction
                        else training_window(train_data, rng, m.seq_len,
                                             m.needle_fraction)
                        for _ in range(m.batch_size)])
    params, state, loss = step(params, state, batch)
    losses.append(loss)
    if i == 1:
      first = float(loss)
    if i % m.log_every == 0 or i == m.steps or i == m.copy_steps:
      acc = []
      for ctx, (seq, ans) in probes.items():
        pred = needle_teacher_forced(np.asarray(probe_fn(params, seq)), ans)
        acc.append(f"{ctx}: {pred.all(1).mean():.2f} ({pred.mean():.2f})")
      last, losses = float(np.mean(jax.device_get(losses))), []
      log(f"  step {i:5d}  loss {last:.4f}  needle (teacher-forced, "
          f"training text; whole (bytes)) {', '.join(acc)}  "
          f"{time.time() - start:6.0f}s")
  stats = dict(steps=m.steps, seconds=round(time.time() - start, 1),
               first_loss=first, final_train_loss=last, n_params=int(n))
  return {"params": params}, stats


def get_llama(c: Config, workdir: str, train_data: np.ndarray, digest: str,
              log: Log):
  """(model, variables, stats, cached): restored from the workdir's cache or
  trained and cached."""
  model = llama.LlamaForCausalLM(llama_config(c))
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, c.llama.seq_len), jnp.int32))
  return (model, *lm_task.cached_training(
      os.path.join(workdir, "baseline_kv", llama_key(c, digest)), template,
      lambda: train_llama(c, model, train_data, log), log, "Llama"))


# ---------------------------------------------------------------------------
# Evaluation under a compressed cache
# ---------------------------------------------------------------------------

def stream_nll(model, variables, tokens: np.ndarray, spec: Any,
               capacity: int) -> np.ndarray:
  """Teacher-forced next-token losses (B, N - 1) of tokens (B, N), fed one
  token at a time through a cache made by `spec` for `capacity` tokens of
  context (a lax.scan: each token attends only to what the cache kept)."""
  return np.asarray(_stream_scan(model, spec, capacity)(
      variables, jnp.asarray(tokens, jnp.int32)))


@functools.lru_cache(maxsize=None)
def _stream_scan(model, spec: Any, capacity: int):
  """The jitted scan of `stream_nll`, one per (model, spec, capacity), so
  every batch of a row reuses its compilation."""

  @jax.jit
  def scan(variables, tokens):
    cache = model.init_cache(tokens.shape[0], capacity, store=spec)

    def step(cache, x):
      tok, nxt = x
      logits, cache = model.apply(variables, tok[:, None], cache=cache)
      return cache, transformer.next_token_loss(logits[:, 0], nxt)

    _, nll = jax.lax.scan(step, cache, (tokens[:, :-1].T, tokens[:, 1:].T))
    return nll.T

  return scan


def needle_prompts(c: Config, filler: np.ndarray, context: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(prompts (N, context), answers (N, 5), depths (N,)) for every depth x
  trial, deterministic given the seed and the context."""
  depths = [float(d) for d in str(c.needle.depths).split(",")]
  rng = np.random.default_rng([c.seed, 23, context])
  ps, ans, ds = [], [], []
  for d in depths:
    for _ in range(c.needle.trials):
      p, a = needle_prompt(filler, rng, context, d)
      ps.append(p)
      ans.append(a)
      ds.append(d)
  return np.stack(ps), np.stack(ans), np.asarray(ds)


def spec_label(spec: Any) -> str:
  pol = "dense" if spec.policy is None else spec.policy.name
  fmt = "float" if spec.keys is None and spec.values is None else "q"
  return f"{pol}-{fmt}"


def greedy(model, variables, spec: Any, prompts: np.ndarray, new: int):
  """(tokens (B, new), decode tokens/s) of greedy generation after equal-
  length prompts through `spec`'s cache (eval.generate)."""
  from compressjax import eval as cj_eval
  res = cj_eval.generate(model, variables, [list(map(int, p)) for p in prompts],
                         max_new_tokens=new, eos_ids=(),
                         bucket=prompts.shape[1], kv_store=spec)
  return res.tokens[:, :new], res


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CacheRow:
  """One cache configuration. spec(context, rope) -> kv.KVSpec for a cache
  of `context` tokens (budgets are `budget` of it) on a model with RoPE or
  learned positions; policy / budget group the rows in the plot."""

  name: str
  description: str
  spec: Callable[[int, bool], Any]
  policy: str = "dense"
  budget: float = 1.0


def _quant(c: Config, fmt: str, axis: str = "token", group=None,
           sym: bool = False, rotate: bool = False) -> kv.KVQuant:
  return kv.KVQuant(fmt, axis, group, symmetric=sym, rotate=rotate)


def _formats(c: Config) -> dict[str, tuple[Callable[[], dict], str]]:
  g, r = c.kv.group_size, c.kv.residual
  return {
      "float": (lambda: {}, "float32 cache"),
      "int8": (lambda: dict(keys=_quant(c, "int8"), values=_quant(c, "int8")),
               "int8 per token (asymmetric, one scale per head vector)"),
      "fp8": (lambda: dict(keys=_quant(c, "fp8_e4m3", sym=True),
                           values=_quant(c, "fp8_e4m3", sym=True)),
              "fp8 e4m3 per token (absmax scale per head vector)"),
      "int4": (lambda: dict(keys=_quant(c, "int4", group=g),
                            values=_quant(c, "int4", group=g)),
               f"int4 per token, groups of {g} channels, no window"),
  }


_KIVI = re.compile(r"^kivi(\d)(?:_r(\d+))?(_rot)?$")
_POLICY = re.compile(r"^(window|sink|h2o|snapkv|tova|random)(_pyramid)?_(\d+)"
                     r"(\+int4|\+int8)?$")


def make_row(name: str, c: Config) -> CacheRow:
  """The row called `name`: a format (float, int8, fp8, int4), KIVI
  (kivi<bits>[_r<R>][_rot]) or policy_<percent>[+int4|+int8] (policies:
  window, sink, h2o, snapkv, tova, random; _pyramid: PyramidKV budgets)."""
  g = c.kv.group_size
  fmts = _formats(c)
  if name in fmts:
    make, desc = fmts[name]
    return CacheRow(name, desc, lambda ctx, rope: kv.KVSpec(**make()))
  m = _KIVI.match(name)
  if m:
    bits, r, rot = int(m[1]), int(m[2] if m[2] is not None else
                                  c.kv.residual), bool(m[3])
    keys, values = kv.kivi(bits, g, rotate=rot)
    return CacheRow(name, f"KIVI-{bits}: keys per channel / values per token in "
               f"groups of {g}, {r} recent tokens float"
               + (", Hadamard-rotated keys" if rot else ""),
               lambda ctx, rope: kv.KVSpec(keys=keys, values=values,
                                           residual=r))
  m = _POLICY.match(name)
  if not m:
    raise ValueError(f"unknown row {name!r}; use float, int8, fp8, int4, "
                     "kivi<bits>[_r<R>][_rot] or <policy>[_pyramid]_<pct>"
                     "[+int4|+int8] with policy in window, sink, h2o, "
                     "snapkv, tova, random")
  pname, pyramid, pct, quant = m[1], bool(m[2]), int(m[3]), m[4]
  frac = pct / 100.0
  if not 0 < frac <= 1:
    raise ValueError(f"row {name!r}: the budget must be 1..100 percent")

  def spec(ctx: int, rope: bool):
    kw = {}
    if pname == "sink":
      pol = kv.SinkWindow(c.kv.sinks, reposition=rope)
    elif pname == "snapkv":
      pol = kv.SnapKV(window=c.kv.snapkv_window)
    else:
      pol = kv.policies.get(pname)
    tokens = max(pol.min_budget(), int(round(frac * ctx)))
    budget = kv.Pyramid(tokens, c.kv.pyramid_beta) if pyramid else tokens
    if quant:
      q = _quant(c, quant[1:], group=g if quant == "+int4" else None)
      kw = dict(keys=q, values=q)
    return kv.KVSpec(policy=pol, budget=budget, **kw)

  desc = {"window": "sliding window", "sink": f"StreamingLLM: "
          f"{c.kv.sinks} sinks + window", "h2o": "H2O: heavy hitters + "
          "recent (half/half)", "snapkv": f"SnapKV: votes of the last "
          f"{c.kv.snapkv_window} queries, max-pooled",
          "tova": "TOVA: lowest attention of the current query",
          "random": "random eviction (control)"}[pname]
  desc += f", {pct}% budget" + (" (pyramid)" if pyramid else "") + (
      f", {quant[1:]} entries" if quant else "")
  return CacheRow(name, desc, spec, pname + ("_pyramid" if pyramid else "") +
             (quant or ""), frac)


def parse_rows(spec: str, c: Config) -> list[CacheRow]:
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate rows in {spec!r}")
  return [make_row(n, c) for n in names]


# ---------------------------------------------------------------------------
# Measurements of one row
# ---------------------------------------------------------------------------

def cache_memory(model, spec: Any, context: int) -> dict:
  """True bytes of the cache (batch 1, `context` tokens) from shapes only,
  per token per layer, and the float cache's."""
  shaped = jax.eval_shape(lambda: model.init_cache(1, context, store=spec))
  dense = jax.eval_shape(lambda: model.init_cache(1, context,
                                                  store=kv.KVSpec()))
  total = kv.memory(shaped)["bytes"]
  entries = sum(s.entry_nbytes() for s in shaped)
  ref = sum(s.entry_nbytes() for s in dense)
  s0 = shaped[0]
  per_elem = 8 * entries / (len(shaped) * context * s0.kv_heads *
                            s0.head_dim * 2)
  return dict(cache_bytes=int(total), cache_entry_bytes=int(entries),
              cache_ratio=ref / entries,
              cache_bits_per_element=round(per_elem, 3),
              cache_budget_tokens=[int(s.capacity) for s in shaped])


def val_windows(data: np.ndarray, length: int, n: int, bos: bool
                ) -> np.ndarray:
  """n windows of length + 1 tokens spread over `data` (BOS first if bos)."""
  body = length if bos else length + 1
  starts = np.linspace(0, len(data) - body - 1, n).astype(int)
  w = np.stack([data[s:s + body] for s in starts]).astype(np.int32)
  if bos:
    w = np.concatenate([np.full((n, 1), BOS, np.int32), w], axis=1)
  return w


def perplexity(model, variables, windows: np.ndarray, spec: Any,
               capacity: int, batch: int = 16) -> tuple[float, np.ndarray]:
  nll = np.concatenate([stream_nll(model, variables, windows[i:i + batch],
                                   spec, capacity)
                        for i in range(0, len(windows), batch)])
  return float(np.exp(nll.mean())), nll


def byte_baseline(c: Config, workdir: str, log: Log):
  """(model, variables, stats): the default experiment's byte LM, trained
  and cached in <workdir>/baseline/<key> by the same code (so a workdir of
  experiments.compress_lm is reused)."""
  from configs import default
  d = default.get_config()
  d.data, d.seed = c.data, c.seed
  d.model, d.train = c.byte_lm.model, c.byte_lm.train
  train, _, split = lm_task.load_data(d)
  model = lm_task.build_model(d)
  key = lm_task.baseline_key(d, split.digest)
  variables, stats, _ = lm_task.get_baseline(d, model, train, key, workdir,
                                             log)
  return model, variables, stats


def evaluate_row(row: CacheRow, c: Config, ctx: dict, log: Log) -> dict:
  """Every measurement of one row (see the module docstring)."""
  out: dict[str, Any] = {}
  t0 = time.time()
  if "byte" in ctx:
    model, variables, windows = ctx["byte"]
    seq = windows.shape[1] - 1
    out["byte_val_ppl"], _ = perplexity(model, variables, windows,
                                        row.spec(seq, False), seq)
  model, variables = ctx["llama"]
  seq = c.llama.seq_len
  spec = row.spec(seq, True)
  out["val_ppl"], _ = perplexity(model, variables, ctx["llama_windows"],
                                 spec, seq)
  streams = ctx["streams"]
  _, nll = perplexity(model, variables, streams, spec, streams.shape[1] - 1)
  out["stream_ppl"] = float(np.exp(nll.mean()))
  out["stream_ppl_past"] = float(np.exp(nll[:, seq:].mean()))
  accs, hits = {}, []
  for context, (prompts, answers, depths) in ctx["needles"].items():
    toks, _ = greedy(model, variables, row.spec(context, True), prompts,
                     answers.shape[1])
    ok = np.all(toks == answers, axis=1)
    hits.append(ok)
    accs[str(context)] = {f"{d:g}": float(ok[depths == d].mean())
                          for d in np.unique(depths)}
  out["needle_acc"] = float(np.concatenate(hits).mean())
  out["needle"] = accs
  if row.name in ctx["speed_rows"]:
    new = c.speed.new_tokens
    for b in [int(x) for x in str(c.speed.batches).split(",")]:
      prompts = ctx["speed_prompts"][:b]
      _, res = greedy(model, variables, row.spec(prompts.shape[1] + new,
                                                 True), prompts, new)
      out[f"tokens_per_s_b{b}"] = round(res.decode_tokens_per_s, 1)
  out.update(cache_memory(model, spec, seq))
  out["eval_seconds"] = round(time.time() - t0, 1)
  log(f"  {row.name:18s} val ppl {out['val_ppl']:.3f}  stream "
      f"{out['stream_ppl_past']:.3f}  needle {out['needle_acc']:.2f}  "
      f"cache x{out['cache_ratio']:.2f}  ({out['eval_seconds']:.0f}s)")
  return out


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def prepare(c: Config, workdir: str, log: Log, rows: list[CacheRow]) -> dict:
  """Models (trained or restored) and every evaluation input."""
  train, val, split = lm_task.load_data(c)  # the byte LM's split
  ctx: dict[str, Any] = dict(split=split)
  if c.byte_lm.enabled:
    model, variables, stats = byte_baseline(c, workdir, log)
    ctx["byte"] = (model, variables,
                   val_windows(val, c.byte_lm.model.seq_len,
                               c.byte_lm.windows, bos=False))
    ctx["byte_stats"] = stats
  model, variables, stats, cached = get_llama(c, workdir, train,
                                              split.digest, log)
  ctx["llama"] = (model, variables)
  ctx["llama_stats"], ctx["llama_cached"] = stats, cached
  seq = c.llama.seq_len
  ctx["llama_windows"] = val_windows(val, seq, c.llama.windows, bos=True)
  ctx["streams"] = val_windows(val, c.stream.length, c.stream.batch,
                               bos=True)
  ctx["needles"] = {int(n): needle_prompts(c, val, int(n))
                    for n in str(c.needle.contexts).split(",")}
  biggest = max(int(b) for b in str(c.speed.batches).split(","))
  ctx["speed_prompts"] = val_windows(val, c.speed.prompt - 1, biggest,
                                     bos=True)
  ctx["speed_rows"] = {r.strip() for r in str(c.speed.rows).split(",")}
  return ctx


def run(c: Config, workdir: str, log: Log = print) -> list[dict]:
  """Every row of c.rows; writes results.json / .md / .png into workdir."""
  rows = parse_rows(c.rows, c)  # bad names fail before any training
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2, sort_keys=True))
  ctx = prepare(c, workdir, log, rows)
  model, variables = ctx["llama"]
  n_params = sum(x.size for x in jax.tree.leaves(variables))
  size = sum(x.nbytes for x in jax.tree.leaves(variables))
  results = []
  log(f"{len(rows)} rows")
  for row in rows:
    t0 = time.time()
    r = dict(method=row.name, description=row.description, metric="val_ppl",
             policy=row.policy, budget=row.budget)
    r.update(evaluate_row(row, c, ctx, log))
    r.update(value=r["val_ppl"], bits_per_weight=32.0,
             bits_per_weight_model=32.0, size_bytes=int(size),
             compression_ratio=1.0, seconds=round(time.time() - t0, 1))
    results.append(r)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  header = describe(c, ctx, n_params)
  write_markdown(os.path.join(workdir, "results.md"), results, header,
                 quality_bars(results, c))
  write_plot(os.path.join(workdir, "results.png"), results)
  return results


def describe(c: Config, ctx: dict, n_params: int) -> dict:
  s = ctx["llama_stats"]
  m = c.llama
  h = {
      "llama": (f"RoPE Llama, hidden {m.hidden_size}, {m.num_hidden_layers} "
                f"layers, {m.num_attention_heads} heads / "
                f"{m.num_key_value_heads} kv heads, {n_params:,} params; "
                f"{s['steps']} steps x {m.batch_size} x {m.seq_len} bytes "
                f"({m.needle_fraction:.0%} needle windows), final loss "
                f"{s['final_train_loss']:.3f}" +
                (" (cached)" if ctx["llama_cached"] else "")),
      "val_ppl": (f"{c.llama.windows} validation windows of {m.seq_len} "
                  "(BOS first), one token at a time through the cache; "
                  "budgets: percent of the window"),
      "stream": (f"{c.stream.batch} streams of {c.stream.length} tokens "
                 f"(training length {m.seq_len}); budgets: percent of "
                 f"{m.seq_len}; stream_ppl_past: tokens at positions >= "
                 f"{m.seq_len}"),
      "needle": (f"contexts {c.needle.contexts}, depths {c.needle.depths}, "
                 f"{c.needle.trials} trials each, greedy exact match of 5 "
                 "bytes; budgets: percent of the context"),
      "speed": (f"greedy decoding, prompt {c.speed.prompt} + "
                f"{c.speed.new_tokens} new tokens (eval.generate, compile "
                "excluded)"),
      "data": f"stdlib bytes, digest {ctx['split'].digest[:12]}",
  }
  if "byte" in ctx:
    bm = c.byte_lm.model
    h["byte LM"] = (f"the default experiment's baseline (d_model "
                    f"{bm.d_model}, {bm.n_layers} layers, seq_len "
                    f"{bm.seq_len}), {c.byte_lm.windows} validation windows")
  return h


def _find(results: list[dict], name: str) -> dict | None:
  return next((r for r in results if r["method"] == name), None)


def quality_bars(results: list[dict], c: Config) -> list[str]:
  """The issue's quality bars, from the rows present (each line: the bar,
  the measured figures, and whether it holds)."""
  lines = []

  def rel(a, b):
    return (a / b - 1) * 100

  f = _find(results, "float")
  for name, limit in (("int8", 0.5), ("kivi4", 3.0)):
    r = _find(results, name)
    if f and r:
      for key, what in (("byte_val_ppl", "byte LM"), ("val_ppl", "Llama")):
        if key in r and key in f:
          d = rel(r[key], f[key])
          lines.append(f"{name} within {limit}% of float ({what}): "
                       f"{r[key]:.4f} vs {f[key]:.4f} ({d:+.2f}%) -> "
                       f"{'PASS' if d <= limit else 'FAIL'}")
  a, b = _find(results, "kivi2_r32"), _find(results, "kivi2_r0")
  if a and b:
    for key, what in (("byte_val_ppl", "byte LM"), ("val_ppl", "Llama")):
      if key in a and key in b:
        lines.append(f"int2 KIVI with a 32-token window better than without"
                     f" ({what}): {a[key]:.3f} vs {b[key]:.3f} -> "
                     f"{'PASS' if a[key] < b[key] else 'FAIL'}")
  for pct in ("25",):
    w = _find(results, f"window_{pct}")
    for p in ("h2o", "snapkv"):
      r = _find(results, f"{p}_{pct}")
      if w and r:
        lines.append(f"{p} beats the window on needle retrieval at {pct}%: "
                     f"{r['needle_acc']:.3f} vs {w['needle_acc']:.3f} -> "
                     f"{'PASS' if r['needle_acc'] > w['needle_acc'] else 'FAIL'}")
  for r in results:
    m = re.match(r"^sink_(\d+)$", r["method"])
    w = m and _find(results, f"window_{m[1]}")
    if w:
      lines.append(f"StreamingLLM sinks beat the window past the training "
                   f"length ({m[1]}% of {c.llama.seq_len} tokens): stream "
                   f"ppl {r['stream_ppl_past']:.3f} vs "
                   f"{w['stream_ppl_past']:.3f} -> "
                   f"{'PASS' if r['stream_ppl_past'] < w['stream_ppl_past'] else 'FAIL'}")
  return lines


def _fmt(x, spec=".3f"):
  return "-" if x is None else format(x, spec)


def write_markdown(path: str, results: list[dict], header: dict,
                   bars: list[str]) -> None:
  lines = ["# compressjax: KV-cache compression (byte-level LMs on stdlib "
           "source)", ""]
  lines += [f"- **{k}**: {v}" for k, v in header.items()]
  lines += ["", "| row | byte LM ppl | Llama ppl | stream ppl (past "
            "training length) | needle acc | cache bits/elem | cache x | "
            "tok/s b1 | tok/s b16 | description |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['method']} | {_fmt(r.get('byte_val_ppl'))} | "
        f"{_fmt(r['val_ppl'])} | {_fmt(r['stream_ppl'])} "
        f"({_fmt(r['stream_ppl_past'])}) | {_fmt(r['needle_acc'], '.2f')} | "
        f"{_fmt(r['cache_bits_per_element'], '.2f')} | "
        f"{_fmt(r['cache_ratio'], '.2f')} | "
        f"{_fmt(r.get('tokens_per_s_b1'), '.0f')} | "
        f"{_fmt(r.get('tokens_per_s_b16'), '.0f')} | {r['description']} |")
  if bars:
    lines += ["", "## Quality bars", ""] + [f"- {b}" for b in bars]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(path: str, results: list[dict]) -> None:
  """Quality vs cache size (fraction of the float cache) per policy:
  Llama perplexity, streaming perplexity past the training length, needle
  accuracy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = (("val_ppl", "Llama val ppl"), ("stream_ppl_past",
                                         "stream ppl past training length"),
          ("needle_acc", "needle accuracy"))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  groups: dict[str, list[dict]] = {}
  for r in results:
    groups.setdefault(r["policy"], []).append(r)
  for ax, (key, title) in zip(axes, keys):
    for pol, rs in groups.items():
      rs = sorted(rs, key=lambda r: 1 / r["cache_ratio"])
      x = [1 / r["cache_ratio"] for r in rs]
      y = [r[key] for r in rs]
      if pol == "dense":  # formats: points, labelled
        ax.scatter(x, y, marker="x", color="k")
        for r, xi, yi in zip(rs, x, y):
          ax.annotate(r["method"], (xi, yi), fontsize=7)
      else:
        ax.plot(x, y, marker="o", label=pol)
    ax.set_xscale("log")
    ax.set_xlabel("cache size / float cache")
    ax.set_title(title)
    if key != "needle_acc":
      ax.set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  # pinned XLA flags and <workdir>/jax_cache, as every experiment
  config, workdir = harness.setup_main(argv)
  run(config, workdir, log=lambda s: print(s, flush=True))
  with open(os.path.join(workdir, "results.md")) as fh:
    print(fh.read())


if __name__ == "__main__":
  from absl import app
  harness.define_flags(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "kv.py"), "/tmp/cj_kv")
  app.run(main)
