"""Peak host memory of `hub.load_pretrained` against the checkpoint's size.

Writes a random checkpoint of the toy family (tests/models/hf_fixtures.py: an
embedding, a conv, Linear and Conv1D-style kernels, norms) in bfloat16 and in
float32, then loads it in a fresh subprocess per case and reads the process's
peak resident memory (VmHWM, reset through /proc/self/clear_refs after imports
and a jax warm-up, so it covers the load alone). Reported: the peak minus the
resident memory before the load, as a ratio to the checkpoint file size and to
the loaded weights (target dtype). A reference row loads the same file with one
safetensors mapping held open for the whole load (what the hub avoids).

  python bench/hub.py [--layers 16] [--hidden 1024] [--vocab 16000]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from compressjax.models import hub
from tests.models import hf_fixtures  # registers the toy family

def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key):
      return int(line.split()[1]) * 1024

jnp.ones(4).block_until_ready()
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # resets VmHWM to the current RSS
rss0 = status("VmRSS:")
t0 = time.perf_counter()
mode, path, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = None if dtype == "none" else dtype
if mode == "hub":
  tree = hub.load_pretrained(path, dtype=dtype).variables
else:  # one mapping for the whole file
  from safetensors import safe_open
  with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
    tree = {{k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}}
jax.block_until_ready(tree)
dt = time.perf_counter() - t0
nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
print(json.dumps(dict(peak=status("VmHWM:") - rss0, rss=status("VmRSS:") - rss0,
                      weights=nbytes, seconds=dt)))
"""


def measure(mode: str, path: pathlib.Path, dtype: str | None) -> dict:
  code = CHILD.format(root=str(ROOT))
  out = subprocess.run(
      [sys.executable, "-c", code, mode, str(path), dtype or "none"],
      check=True, capture_output=True, text=True,
      env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=16000)
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  from tests.models import hf_fixtures as fx
  cfg = fx.toy_config_dict(vocab_size=a.vocab, hidden_size=a.hidden,
                           intermediate_size=4 * a.hidden,
                           num_hidden_layers=a.layers)
  sd = fx.toy_state_dict(cfg, lm_head=False)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for ckpt in ("bfloat16", "float32"):
      d = fx.write_hf_dir(pathlib.Path(tmp) / ckpt, sd, cfg, dtype=ckpt)
      size = (d / "model.safetensors").stat().st_size
      cases = [("hub", None), ("hub", "float32" if ckpt == "bfloat16"
                               else "bfloat16"), ("one mapping", None)]
      for mode, dtype in cases:
        t = time.perf_counter()
        r = measure("hub" if mode == "hub" else "one", d, dtype)
        r.update(checkpoint=ckpt, mode=mode, dtype=dtype or ckpt, file=size,
                 wall=time.perf_counter() - t)
        rows.append(r)
  mb = 1e6
  print(f"{'checkpoint':>10} {'loader':>11} {'to':>9} {'file MB':>8} "
        f"{'weights MB':>10} {'peak MB':>8} {'peak/file':>9} "
        f"{'peak/weights':>12} {'load s':>7}")
  for r in rows:
    print(f"{r['checkpoint']:>10} {r['mode']:>11} {r['dtype']:>9} "
          f"{r['file'] / mb:8.1f} {r['weights'] / mb:10.1f} "
          f"{r['peak'] / mb:8.1f} {r['peak'] / r['file']:9.2f} "
          f"{r['peak'] / r['weights']:12.2f} {r['seconds']:7.2f}")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
