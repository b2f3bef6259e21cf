r"""The default experiment: compress a byte-level LM; measure size, perplexity.

1. Train a small float transformer LM on the Python standard library's source
   bytes (a pinned snapshot; cached in the workdir, keyed by a hash of the
   data, model and train configs, so reruns and runs that change only
   compression settings skip it): `experiments.lm_task`.
2. Compress the baseline with every row of `config.methods`
   (`experiments.rows`: a row's name states its settings) and evaluate
   validation perplexity by running the unmodified model on the compressed
   tree (`compressjax.run` under jit): `experiments.harness`.
3. Write results.json, results.md, results.png, per-layer summaries and a
   checkpoint of every compressed tree into the workdir.

    python -m experiments.compress_lm --workdir=runs/default
    python -m experiments.compress_lm --workdir=runs/default \
        --config.methods=float32,int3_g128,gptq_int3_g128
    python -m experiments.readme_table runs/default/results.md  # README table
"""

from __future__ import annotations

import os

from absl import app

from experiments import harness
from experiments import lm_task


def main(argv):
  config, workdir = harness.setup_main(argv)
  lm_task.run(config, workdir)
  with open(os.path.join(workdir, "results.md")) as fh:
    print(fh.read())


if __name__ == "__main__":
  harness.define_flags(lm_task.DEFAULT_CONFIG, "runs/compress_lm")
  app.run(main)
