"""Hugging Face directories: load, save, round trips, every error, tokenizer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import compressjax as cj
from compressjax.core.errors import CompressionError
from compressjax.models import hub
from compressjax.quantization.rtn import quantize_array
from tests.models import hf_fixtures as fx

TEXTS = ["the quick brown fox jumps over the lazy dog",
         "pack my box with five dozen liquor jugs",
         "how vexingly quick daft zebras jump!"] * 4


def _flax_expected(sd, i=0):
  """Hand-written torch -> flax layouts of the toy's tensors."""
  p = "model."
  return {
      "embed/embedding": sd[p + "embed.weight"],
      "patch/kernel": sd[p + "patch.weight"].transpose(2, 3, 1, 0),
      "proj/kernel": sd[p + "proj.weight"],
      f"block_{i}/up/kernel": sd[p + f"layers.{i}.up.weight"].T,
      f"block_{i}/down/kernel": sd[p + f"layers.{i}.down.weight"].T,
      f"block_{i}/norm/scale": sd[p + f"layers.{i}.norm.weight"],
  }


def _flat(variables):
  return dict(cj.core.tree.leaves_with_paths(variables))


def _assert_trees_identical(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]).view(np.uint8),
                                  np.asarray(fb[k]).view(np.uint8), err_msg=k)


def test_load_layouts_prefixless_names_and_buffers(tmp_path):
  cfg = fx.toy_config_dict()
  sd = fx.toy_state_dict(cfg)
  pre = hub.load_pretrained(fx.write_hf_dir(tmp_path / "a", sd, cfg))
  flat = _flat(pre.variables)
  for path, want in _flax_expected(sd).items():
    np.testing.assert_array_equal(np.asarray(flat["params/" + path]), want)
  assert pre.tokenizer is None and pre.hf_config["model_type"] == "cj_toy"
  # A base-model checkpoint without the 'model.' prefix, with a buffer the
  # table ignores, and without the tied lm_head, loads the same values.
  bare = {k.removeprefix("model."): v for k, v in sd.items()
          if k != "lm_head.weight"}
  bare["layers.1.rotary.inv_freq"] = np.arange(4, dtype=np.int64)
  pre2 = hub.load_pretrained(fx.write_hf_dir(tmp_path / "b", bare, cfg))
  _assert_trees_identical(pre.variables, pre2.variables)
  logits = jax.jit(pre.module.apply)(
      pre.variables, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 4, 4, 3)))
  assert logits.shape == (1, 7, cfg["vocab_size"])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_bit_exact(tmp_path, dtype, shards):
  cfg = fx.toy_config_dict(tie_word_embeddings=False, custom_key=[1, 2])
  sd = fx.toy_state_dict(cfg, seed=1)
  src = fx.write_hf_dir(tmp_path / "src", sd, cfg, dtype=dtype, shards=shards)
  (src / "generation_config.json").write_text('{"max_length": 7}')
  pre = hub.load_pretrained(src)
  assert {x.dtype.name for x in jax.tree.leaves(pre.variables)} == {dtype}
  # Shard by size into several files (index.json), or write one file.
  files = hub.save_pretrained(tmp_path / "out", pre,
                              max_shard_size=None if shards == 1 else "8KB")
  assert (len(files) > 2) == (shards > 1)
  again = hub.load_pretrained(tmp_path / "out")
  _assert_trees_identical(pre.variables, again.variables)
  # The written tensors are the original ones, bit for bit, under HF names.
  written = {}
  for f in (tmp_path / "out").glob("*.safetensors"):
    with safe_open(str(f), "numpy") as h:
      assert h.metadata() == {"format": "pt"}
      written.update({k: h.get_tensor(k) for k in h.keys()})
  assert written.keys() == sd.keys()
  for k, v in sd.items():
    want = v.astype(fx.DTYPES[dtype])
    assert written[k].dtype == want.dtype
    np.testing.assert_array_equal(written[k].view(np.uint8),
                                  want.view(np.uint8), err_msg=k)
  out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert out_cfg["custom_key"] == [1, 2] and out_cfg["torch_dtype"] == dtype
  assert json.loads((tmp_path / "out" / "generation_config.json").read_text()
                    ) == {"max_length": 7}
  if shards > 1:
    index = json.loads(
        (tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        v.astype(fx.DTYPES[dtype]).nbytes for v in sd.values())
    assert index["weight_map"].keys() == sd.keys()
    assert set(index["weight_map"].values()) == set(files[:-1])
    for name, file in index["weight_map"].items():
      with safe_open(str(tmp_path / "out" / file), "numpy") as h:
        assert name in h.keys()


@pytest.mark.parametrize("src,dst", [("float32", "bfloat16"),
                                     ("bfloat16", "float32"),
                                     ("float16", "bfloat16"),
                                     ("float32", "float16")])
def test_dtype_conversion_on_load(tmp_path, src, dst):
  cfg = fx.toy_config_dict()
  sd = fx.toy_state_dict(cfg, seed=2)
  pre = hub.load_pretrained(fx.write_hf_dir(tmp_path, sd, cfg, dtype=src),
                            dtype=dst)
  flat = _flat(pre.variables)
  for path, want in _flax_expected(sd).items():
    got = flat["params/" + path]
    # Round to nearest even from the stored value (ml_dtypes, as jnp casts).
    ref = np.ascontiguousarray(want).astype(fx.DTYPES[src]).astype(
        fx.DTYPES[dst])
    assert got.dtype == jnp.dtype(dst)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8),
                                  np.asarray(ref).view(np.uint8))


def test_save_casts_and_refuses_compressed(tmp_path):
  cfg = fx.toy_config_dict()
  sd = fx.toy_state_dict(cfg, seed=3)
  pre = hub.load_pretrained(fx.write_hf_dir(tmp_path / "a", sd, cfg))
  hub.save_pretrained(tmp_path / "b", (pre.family, pre.config, pre.variables),
                      dtype="bf16")
  b = hub.load_pretrained(tmp_path / "b")
  want = np.asarray(sd["model.layers.0.up.weight"].T.astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(
      np.asarray(b.variables["params"]["block_0"]["up"]["kernel"]), want)
  # A sharded save over a single-file directory leaves no stale weights.
  hub.save_pretrained(tmp_path / "b", pre, max_shard_size=20_000)
  assert not (tmp_path / "b" / "model.safetensors").exists()
  # Loaded arrays own their memory: overwriting the files leaves them be.
  np.testing.assert_array_equal(
      np.asarray(b.variables["params"]["block_0"]["up"]["kernel"]), want)
  hub.save_pretrained(tmp_path / "b", pre)
  assert not list((tmp_path / "b").glob("model-*"))
  assert not (tmp_path / "b" / "model.safetensors.index.json").exists()
  q = jax.tree.map(lambda x: x, pre.variables)
  q["params"]["block_0"]["up"]["kernel"] = jax.jit(
      lambda w: quantize_array(w, 4, group_size=16))(
          q["params"]["block_0"]["up"]["kernel"])
  with pytest.raises(CompressionError, match="save_gptq.*block_0/up/kernel"):
    hub.save_pretrained(tmp_path / "c", (pre.family, pre.config, q))
  with pytest.raises(CompressionError, match="max_shard_size"):
    hub.save_pretrained(tmp_path / "c", pre, max_shard_size="lots")
  with pytest.raises(CompressionError, match="int8.*not a weight dtype"):
    hub.save_pretrained(tmp_path / "c", pre, dtype="int8")
  assert hub.parse_size("2GB") == 2 * 10**9
  assert hub.parse_size("1.5MiB") == 3 * 2**19


# -- errors -------------------------------------------------------------------


def _good(tmp_path, **kw):
  cfg = fx.toy_config_dict()
  return fx.write_hf_dir(tmp_path / "m", fx.toy_state_dict(cfg), cfg, **kw), cfg


def _raises(path, match):
  with pytest.raises(CompressionError, match=match):
    hub.load_pretrained(path)


def test_errors_directory_and_config(tmp_path):
  _raises(tmp_path / "nope", r"nope does not exist; pass the directory")
  (tmp_path / "file").write_text("x")
  _raises(tmp_path / "file", r"file is a file")
  (tmp_path / "empty").mkdir()
  _raises(tmp_path / "empty", r"empty/config.json is missing")
  d, cfg = _good(tmp_path)
  (d / "config.json").write_text("{not json")
  _raises(d, r"m/config.json is not valid JSON")
  (d / "config.json").write_text("[1, 2]")
  _raises(d, r"m/config.json holds a list")
  (d / "config.json").write_text(json.dumps({"hidden_size": 3}))
  _raises(d, r"m/config.json has no 'model_type'")
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuch"}))
  _raises(d, r"unsupported model_type 'nosuch'.*cj_toy")
  (d / "config.json").write_text(json.dumps(
      {**cfg, "quantization_config": {"quant_method": "gptq"}}))
  _raises(d, r"quantized checkpoint \(quant_method 'gptq'\)")
  del cfg["num_channels"]
  (d / "config.json").write_text(json.dumps(cfg))
  _raises(d, r"lacks 'num_channels'")


def test_errors_weight_files(tmp_path):
  d, cfg = _good(tmp_path)
  raw = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(raw[:-64])
  _raises(d, r"m/model.safetensors is not a readable safetensors file.*"
             r"truncated or corrupt")
  (d / "model.safetensors").unlink()
  _raises(d, r"holds no weights: expected model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"\x80")
  _raises(d, r"only PyTorch pickles.*convert them to safetensors")
  (d / "pytorch_model.bin").unlink()
  (d / "weights.safetensors").write_bytes(raw)
  _raises(d, r"only weights.safetensors; rename")


def test_errors_shards(tmp_path):
  d, cfg = _good(tmp_path, shards=3)
  shard2 = d / "model-00002-of-00003.safetensors"
  raw = shard2.read_bytes()
  shard2.write_bytes(raw[: len(raw) // 2])
  _raises(d, r"model-00002-of-00003.safetensors is not a readable")
  shard2.unlink()
  _raises(d, r"lists shard 'model-00002-of-00003.safetensors'.*is missing")
  shard2.write_bytes(raw)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  name = next(iter(index["weight_map"]))
  index["weight_map"][name] = "model-00003-of-00003.safetensors"
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  _raises(d, rf"places tensor '{name}' in 'model-00003-of-00003")
  (d / "model.safetensors.index.json").write_text(json.dumps({"x": 1}))
  _raises(d, r"index.json has no 'weight_map'")


@pytest.mark.parametrize("change,match", [
    ("missing", r"/m: the checkpoint does not match.*missing tensors "
                r"model.layers.1.up.bias"),
    ("unexpected", r"unexpected tensors model.extra.weight"),
    ("shape", r"tensor 'model.layers.0.up.weight' has shape \(64, 31\).*"
              r"implies \(64, 32\)"),
    ("dtype", r"tensor 'model.proj.bias' in .*model.safetensors has dtype I8"),
])
def test_errors_tensors(tmp_path, change, match):
  cfg = fx.toy_config_dict()
  sd = fx.toy_state_dict(cfg)
  if change == "missing":
    del sd["model.layers.1.up.bias"]
  elif change == "unexpected":
    sd["model.extra.weight"] = np.zeros(3, np.float32)
  elif change == "shape":
    sd["model.layers.0.up.weight"] = np.zeros((64, 31), np.float32)
  else:
    sd["model.proj.bias"] = np.zeros(32, np.int8)
  path = tmp_path / "m"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(sd, str(path / "model.safetensors"))
  _raises(path, match)


# -- tokenizer ----------------------------------------------------------------


def test_tokenizer_round_trip_and_special_ids(tmp_path):
  d, cfg = _good(tmp_path)
  tk = fx.write_tokenizer(d, TEXTS)
  pre = hub.load_pretrained(d)
  t = pre.tokenizer
  assert (t.bos_id, t.eos_id, t.pad_id) == (
      tk.token_to_id("<s>"), tk.token_to_id("</s>"), tk.token_to_id("<pad>"))
  for text in TEXTS[:3] + ["unseen: Zebras jump over 12 boxes ü"]:
    ids = t.encode(text)
    assert ids[0] == t.bos_id and ids == tk.encode(text).ids
    assert t.decode(ids) == text
    assert t.encode(text, add_special_tokens=False) == ids[1:]
  # Trained merges: fewer tokens than bytes on the training texts.
  assert len(t.encode(TEXTS[0])) < len(TEXTS[0].encode()) // 2
  batch = t.encode(TEXTS[:2])
  assert batch == [t.encode(x) for x in TEXTS[:2]]
  ids, mask = t.encode_padded(["the fox", TEXTS[0]])
  n = len(t.encode("the fox"))
  assert ids.shape == mask.shape == (2, len(t.encode(TEXTS[0])))
  assert mask[0].sum() == n and np.all(ids[0, n:] == t.pad_id)
  assert t.decode(ids) == ["the fox", TEXTS[0]]
  # save_pretrained copies the tokenizer files verbatim.
  hub.save_pretrained(tmp_path / "out", pre)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "out" / f).read_bytes() == (d / f).read_bytes()
  assert hub.load_pretrained(tmp_path / "out").tokenizer.encode(TEXTS[1]) == (
      t.encode(TEXTS[1]))


def test_tokenizer_ids_from_configs_and_missing(tmp_path, caplog):
  d, cfg = _good(tmp_path)
  tk = fx.write_tokenizer(d, TEXTS)
  (d / "tokenizer_config.json").write_text("{}")
  (d / "config.json").write_text(json.dumps(
      {**cfg, "bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": None}))
  t = hub.load_pretrained(d).tokenizer
  assert (t.bos_id, t.eos_id, t.pad_id, t.eos_ids) == (1, 2, None, (2, 0))
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
  assert hub.load_pretrained(d).tokenizer.eos_id == 0
  # In memory (no source dir): tokenizer.json and the special tokens written.
  t2 = hub.load_pretrained(d).tokenizer
  from compressjax.models.tokenizer import Tokenizer
  Tokenizer(tk, 1, 2, 0).save(tmp_path / "mem")
  saved = json.loads((tmp_path / "mem" / "tokenizer_config.json").read_text())
  assert saved["eos_token"] == "</s>" and saved["pad_token"] == "<pad>"
  assert t2.encode("fox") == tk.encode("fox").ids
  (d / "tokenizer.json").write_text("{broken")
  _raises(d, r"tokenizer.json could not be read")
  (d / "tokenizer.json").unlink()
  with caplog.at_level("INFO", logger="absl"):
    assert hub.load_pretrained(d).tokenizer is None
  assert "no tokenizer.json" in caplog.text
