"""KV-cache benchmark: decode step time vs the dense cache, and memory per
token against theory.

One attention layer of a Llama-3-8B shape (32 query heads, 8 kv heads,
head_dim 128), batch 1, float32. For each context (default 1k, 4k, 16k) and
store: fill it with `context` tokens (`append`), then time one jitted decode
step (`store.attention` for one new token: encode, attend over what is kept,
policy update and write; the store buffers are donated, so writes are in
place), median over `repeats` steps, as a ratio to the dense float cache
(`kv.DenseKV`) at the same context, timed in the same run (ratio < 1:
faster). Memory: true bytes of the keys and values held per context token
(`nbytes` of the KVCodes codes, scales and zero points; float window
separate), bits per cached element, and the spec's theory
(`KVSpec.bits_per_element`: codes + scale + zero per group).

  python bench/kv.py [--contexts 1024,4096,16384] [--repeats 7]
                     [--stores dense,int8,kivi2,h2o_25]

On CPU the XLA path runs; the Pallas decode kernel (KVSpec(attention=
"pallas")) is meant for GPU/TPU and is not timed here (interpret mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import kv
from compressjax.kv.quant import entry_nbytes

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _q(fmt, axis="token", group=None, sym=False):
  return kv.KVQuant(fmt, axis, group, symmetric=sym)


def stores(context: int) -> dict:
  """name -> (store factory for `capacity` tokens, description)."""
  quarter = context // 4
  int4 = _q("int4", group=128)
  return {
      "dense": (kv.DenseKV, "DenseKV float32 (reference)"),
      "float": (kv.KVSpec(), "KVCache float32, no policy"),
      "int8": (kv.KVSpec(keys=_q("int8"), values=_q("int8")),
               "int8 per token"),
      "fp8": (kv.KVSpec(keys=_q("fp8_e4m3", sym=True),
                        values=_q("fp8_e4m3", sym=True)), "fp8 e4m3 per token"),
      "int4_g128": (kv.KVSpec(keys=int4, values=int4),
                    "int4 per token, groups of 128"),
      "kivi4": (kv.KVSpec(None, None, *kv.kivi(4, 32), residual=32),
                "KIVI-4 g32, R=32"),
      "kivi2": (kv.KVSpec(None, None, *kv.kivi(2, 32), residual=32),
                "KIVI-2 g32, R=32"),
      "window_25": (kv.KVSpec(policy="window", budget=quarter),
                    "sliding window, 25% budget"),
      "sink_25": (kv.KVSpec(policy=kv.SinkWindow(reposition=False),
                            budget=quarter), "StreamingLLM, 25% budget"),
      "h2o_25": (kv.KVSpec(policy="h2o", budget=quarter), "H2O, 25% budget"),
      "snapkv_25": (kv.KVSpec(policy="snapkv", budget=quarter),
                    "SnapKV, 25% budget"),
      "tova_25": (kv.KVSpec(policy="tova", budget=quarter),
                  "TOVA, 25% budget"),
      "h2o_25+int4": (kv.KVSpec(policy="h2o", budget=quarter, keys=int4,
                                values=int4), "H2O 25% with int4 g128"),
  }


def filled(factory, context: int, capacity: int):
  """A store of `capacity` slots holding `context` random tokens."""
  store = factory.empty(1, capacity, KV_HEADS, HEAD_DIM)
  ks = jax.random.split(jax.random.key(context), 2)
  k = jax.random.normal(ks[0], (1, context, KV_HEADS, HEAD_DIM))
  v = jax.random.normal(ks[1], (1, context, KV_HEADS, HEAD_DIM))
  pos = jnp.arange(context, dtype=jnp.int32)[None]
  return jax.jit(lambda s, k, v, p: s.append(k, v, p))(store, k, v, pos)


def step_time(store, context: int, repeats: int) -> float:
  """Median seconds of one decode step (one new token at the next position
  each time; the store is donated and threaded through)."""
  step = jax.jit(lambda s, q, k, v, p: s.attention(q, k, v, p,
                                                   scale=HEAD_DIM ** -0.5),
                 donate_argnums=0)
  key = jax.random.key(1)
  q = jax.random.normal(key, (1, 1, HEADS, HEAD_DIM))
  k = jax.random.normal(key, (1, 1, KV_HEADS, HEAD_DIM))
  times = []
  for i in range(repeats + 2):  # two warmup steps (compile)
    p = jnp.full((1, 1), context + i, jnp.int32)
    t0 = time.perf_counter()
    out, store = step(store, q, k, k, p)
    jax.block_until_ready((out, store))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def memory(store, spec, context: int) -> dict:
  main = entry_nbytes(store.keys) + entry_nbytes(store.values)
  window = sum(entry_nbytes(getattr(store, f, None)) for f in
               ("recent_keys", "recent_values"))
  slots = store.keys.shape[2] if hasattr(store, "spec") else store.capacity
  elems = slots * KV_HEADS * HEAD_DIM * 2
  out = dict(bytes_per_token=(main + window) / context,
             bits_per_element=8 * main / elems,
             window_bytes=int(window), total_bytes=int(store.nbytes))
  if hasattr(store, "spec"):
    out["theory_bits"] = float(np.mean(spec.bits_per_element(HEAD_DIM)))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--contexts", default="1024,4096,16384")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--stores", default=",".join(stores(1024)))
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  names = a.stores.split(",")
  print(f"one layer: {HEADS} heads / {KV_HEADS} kv heads x {HEAD_DIM}, batch"
        f" 1, float32; {jax.devices()[0].platform}; median of {a.repeats} "
        "decode steps")
  print(f"{'store':13s} {'context':>7s} {'step ms':>8s} {'vs dense':>8s} "
        f"{'B/token':>8s} {'bits/elem':>9s} {'theory':>7s}  description")
  rows = []
  for context in [int(x) for x in a.contexts.split(",")]:
    table = stores(context)
    dense_t = None
    for name in ["dense"] + [n for n in names if n != "dense"]:
      spec, desc = table[name]
      store = filled(spec, context, context + a.repeats + 2)
      mem = memory(store, spec, context)
      t = step_time(store, context, a.repeats)
      if name == "dense":
        dense_t = t
      r = dict(store=name, context=context, step_ms=t * 1e3,
               ratio=t / dense_t, description=desc, **mem)
      rows.append(r)
      theory = r.get("theory_bits")
      print(f"{name:13s} {context:7d} {t * 1e3:8.2f} {t / dense_t:8.2f} "
            f"{mem['bytes_per_token']:8.0f} {mem['bits_per_element']:9.3f} "
            f"{'-' if theory is None else format(theory, '7.3f'):>7s}  "
            f"{desc}")
      del store
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
