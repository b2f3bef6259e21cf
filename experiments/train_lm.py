r"""Training-based compression of the default LM with longer schedules: QAT,
distillation, dynamic sparse training, each from the cached float baseline.

    python -m experiments.train_lm --config=configs/qat.py --workdir=runs/qat
    python -m experiments.train_lm --config=configs/distill.py --workdir=runs/kd
    python -m experiments.train_lm --config=configs/sparse_training.py \
        --workdir=runs/rigl --config.methods=float32,set_90

The rows are the default table's training rows (`experiments.rows`:
`qat_int4_g128`, `qat_ternary`, `kd_2_4`, `rigl_90`, `set_90`, `gmp_90`,
`float32_ft`), the recipes `experiments.recipes`; the configs only lengthen
`config.finetune`. Fine-tuning runs through `compressjax.train.loop.train`
(orbax checkpoints: an interrupted run resumes exactly; a finished one is
reused), then the result is exported to the same compressed leaves PTQ
produces and evaluated like every row of the default table (results.json,
results.md, checkpoints/ in the workdir). Point --workdir at the default
run's workdir to reuse its cached float baseline.
"""

from __future__ import annotations

from absl import app

from experiments import harness
from experiments import lm_task


def main(argv):
  config, workdir = harness.setup_main(argv)
  lm_task.run(config, workdir)


if __name__ == "__main__":
  harness.define_flags(None, "runs/train_lm")
  app.run(main)
