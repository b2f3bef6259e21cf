"""The training-recipe entry point (experiments/train_lm.py) on the smoke
config: each recipe trains, exports to compressed leaves and is evaluated;
a rerun reuses the finished fine-tuning checkpoint."""

import jax
import ml_collections
import numpy as np
import pytest

import compressjax as cj
from configs import smoke
from experiments import train_lm


def _config(**recipe):
  c = smoke.get_config()
  c.finetune.steps = 3
  c.recipe = ml_collections.ConfigDict(recipe)
  return c


# one recipe end to end (the smoke experiment runs every training row); the
# exported leaf type follows the recipe
@pytest.mark.parametrize("recipe", [
    dict(method="qat", bits=4, format="", group_size=32),
])
def test_recipe_runs_and_reuses_its_checkpoint(tmp_path, recipe):
  c = _config(**recipe)
  out = train_lm.run(c, str(tmp_path), log=lambda s: None)
  f32, row = out["rows"]
  assert np.isfinite(row["value"]) and row["steps"] == 3
  tree = cj.restore(str(tmp_path / "compressed"))
  kinds = {type(x).__name__ for x in jax.tree.leaves(
      tree, is_leaf=cj.is_compressed) if cj.is_compressed(x)}
  assert kinds == ({"SparseArray"} if recipe["method"] == "rigl"
                   else {"QArray"})
  assert row["bits_per_weight"] < f32["bits_per_weight"]
  again = train_lm.run(c, str(tmp_path), log=lambda s: None)
  assert again["rows"][1]["value"] == row["value"]
  assert again["rows"][1]["final_loss"] is None  # loaded, not retrained
