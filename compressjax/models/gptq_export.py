"""GPTQ checkpoints: the layout AutoGPTQ, GPTQModel, vLLM and transformers
(optimum) load.

Layout, per quantized Linear `<m>` (k = in_features, n = out_features, b bits,
G groups of g = k / G consecutive input channels; per channel: G = 1 and
group_size -1 in the config):

  <m>.qweight  int32 (k*b/32, n)   codes u in [0, 2^b), packed along the input
  <m>.qzeros   int32 (G, n*b/32)   zero points, packed along the output axis
  <m>.scales   float16 (G, n)
  <m>.g_idx    int32 (k,)          g_idx[i] = i // g (no act-order permutation,
                                   so desc_act is false)
  <m>.bias     float16 (n,)        when the layer has one, like every other
                                   (float) param under its HF name

and W[i, j] = (u[i, j] - z[g_idx[i], j]) * scales[g_idx[i], j], W being the
(in, out) matrix (the flax kernel; torch's weight transposed).

Packing: element i of the packed axis occupies bits [i*b, (i+1)*b) of the bit
stream the int32 words form, word w holding stream bits [32w, 32w + 32), least
significant first. For b in {2, 4, 8}, code i sits in word i // (32/b) at shift
b * (i % (32/b)); for b = 3, 32 codes fill three words and codes 10 and 21
straddle word boundaries. That is `pallas_kernels.layout`'s LSB-first byte
stream read as little-endian int32, so the packer reuses `layout.pack`.

Zero points (`checkpoint_format`):
  "gptq" (v1, the default; read by AutoGPTQ, vLLM, transformers, GPTQModel):
    qzeros hold z - 1 and loaders add 1 back. z = 0, which an asymmetric group
    whose weights are all >= 0 gets, cannot be stored (z - 1 = -1 would spill
    into the neighbouring fields); such layers are refused with a pointer to
    "gptq_v2".
  "gptq_v2" (GPTQModel; vLLM's gptq kernels with the same key): qzeros hold z.
  Symmetric: sym=True means z = 2^(b-1) in every group (AutoGPTQ's quantizer:
  zero = (maxq + 1) / 2); the zeros are still written (v1: 2^(b-1) - 1, i.e.
  0x77777777 at 4 bits) and vLLM's Marlin kernels for sym=True ignore them and
  subtract 2^(b-1) (types uint4b8 / uint8b128). A symmetric QArray (codes q in
  [-2^(b-1), 2^(b-1) - 1], no zero point; the -7..7 and the full -8..7 grids
  alike) maps to u = q + 2^(b-1), z = 2^(b-1); an asymmetric one (codes u in
  [0, 2^b), zero z) maps to itself. sym is set when every layer has
  z = 2^(b-1) everywhere, else sym=False with the zeros stored (also exact).
  Sources checked: AutoGPTQ `qlinear_cuda_old.QuantLinear.pack` (intweight
  packed LSB first along the input rows, `zeros -= 1` before packing qzeros
  along columns, forward adds 1) and `quantizer.Quantizer.find_params`;
  GPTQModel `convert_gptq_v1_to_v2_format_module` (adds 0x11111111 to 4-bit
  qzeros) and its quantize_config.json files; vLLM `gptq.py` (qweight
  (k / pack_factor, n), qzeros (G, n / pack_factor), scales (G, n) in the
  activation dtype, g_idx = i // group_size; `gptq_gemm` zero offset 1 unless
  checkpoint_format == "gptq_v2"), `gptq_utils.get_dynamic_override` ("-:"
  entries of `dynamic` mark modules left unquantized).

Scales are float16 in the format. A QArray whose scales are not exactly float16
(e.g. quantized with the default scale_dtype=float32) is exported with its
scales rounded to nearest, a warning (or a CompressionError with
inexact_scales="error") and the measured weight error in the report; quantize
with scale_dtype=jnp.float16 for an exact export. Scales that overflow or
flush to zero in float16 are always refused.

Exported: integer QArrays (IntFormat, 2, 3, 4 or 8 bits, symmetric or not) of
2-D Linear kernels (HF nn.Linear weights and GPT-2-style Conv1D weights) with
groups along the input axis (axis 0), per channel, per group or per tensor
(written per channel), scales possibly themselves compressed (double
quantization: materialized, then they must be float16-exact or are rounded as
above). One bits / group_size for the whole checkpoint.

Refused, with a CompressionError naming the param and why:
  - sparse (SparseArray, NMSparseArray), low-rank (LowRank), codebook
    (CodebookArray) leaves and input transforms (InputTransform: rotations or
    smoothing scales that change the layer's input): GPTQ has no place for
    them; materialize those params (cj.materialize_tree) first if a float
    copy is what you want;
  - QArrays of non-integer formats (nf4 / ternary / binary levels, fp8 / fp6 /
    fp4 elements, MX and NVFP4 block scales), and integer widths 5-7 bits
    (GPTQ packs 2, 3, 4 and 8);
  - groups along the output axis (axis != 0), kernels of rank != 2
    (DenseGeneral / Einsum multi-axis kernels, convolutions) and quantized
    params that are not Linear weights (embeddings, norms);
  - in_features or out_features not filling whole int32 words (multiples of
    32/b; 32 for 3 bits);
  - layers of different bits or group sizes in one checkpoint;
  - zero point 0 with checkpoint_format "gptq" (see above).
Float Linear weights left unquantized beside quantized ones (other than
lm_head) are written as float weights and listed as "-:" entries of
`dynamic` (honored by GPTQModel and vLLM; a loader that quantizes every Linear
of a block without reading `dynamic` needs them all quantized).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout
from compressjax.core.errors import CompressionError
from compressjax.core.qarray import QArray
from compressjax.core.input_transform import InputTransform
from compressjax.core.tree import is_compressed, is_float_dtype
from compressjax.formats.integer import IntFormat
from compressjax.models import hf, hub

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANTIZE_CONFIG = "quantize_config.json"


@dataclasses.dataclass(frozen=True)
class LayerExport:
  """One exported Linear.

  Attributes:
    module: HF module name (tensors `<module>.qweight` ...).
    path: zoo param path.
    bits / group_size: as in the config (-1: per channel).
    sym: every zero point is 2^(bits-1).
    scales_exact: the QArray's scales are float16 values.
    max_abs_error / rel_error: max |W_gptq - W| and ||W_gptq - W||_F / ||W||_F
      against the QArray's materialize() (0 when scales are exact).
  """

  module: str
  path: str
  bits: int
  group_size: int
  sym: bool
  scales_exact: bool
  max_abs_error: float
  rel_error: float


@dataclasses.dataclass(frozen=True)
class GPTQReport:
  layers: tuple[LayerExport, ...]
  quantization_config: dict
  files: tuple[str, ...]

  @property
  def scales_exact(self) -> bool:
    return all(l.scales_exact for l in self.layers)


@jax.jit
def _dense_parts(q: QArray):
  """(code values q - 0, float32 scales, materialize()) in one compiled call
  per layer shape and format, instead of one per jnp op."""
  return q.fmt.decode(q.stored_codes()), q.scale_values(), q.materialize()


_pack = jax.jit(layout.pack, static_argnums=(1, 2))


def pack_int32(u, bits: int, axis: int) -> np.ndarray:
  """int32 words of unsigned codes `u` (< 2^bits) packed along `axis`, LSB
  first (module doc); the axis length times `bits` must be a multiple of 32."""
  u = np.asarray(u, np.uint8)
  n = u.shape[axis]
  if n * bits % 32:
    raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words")
  b = np.moveaxis(np.asarray(_pack(u, bits, axis)), axis, -1)
  words = np.ascontiguousarray(b).view("<i4").astype(np.int32)
  return np.ascontiguousarray(np.moveaxis(words, -1, axis))


def _is_linear(spec: hf.TensorSpec, leaf) -> bool:
  """An HF Linear (out, in) weight, or a GPT-2 Conv1D (in, out) one."""
  if spec.layout == "linear":
    return True
  return (spec.layout == "same" and spec.path.split("/")[-1] == "kernel"
          and len(leaf.shape) == 2)


def _layer(module: str, path: str, q: QArray, checkpoint_format: str
           ) -> tuple[dict[str, np.ndarray], LayerExport]:
  """GPTQ tensors of one QArray kernel, checked (module doc)."""
  fmt = q.fmt
  if not isinstance(fmt, IntFormat) or q.scale is None:
    raise CompressionError(
        f"{getattr(fmt, 'name', fmt)} codes have no GPTQ form: GPTQ stores "
        "uniform integers (int2/3/4/8) with scales and zero points; quantize "
        "this layer with an integer format or materialize it", path)
  if len(q.shape) != 2:
    raise CompressionError(
        f"kernel of shape {tuple(q.shape)} is not a 2-D Linear weight; GPTQ "
        "exports (in, out) matrices only", path)
  if tuple(q.contract) != (0,):
    raise CompressionError(
        f"groups run along axes {tuple(q.contract)}; GPTQ groups run along "
        "the input axis: quantize with axis=0 (the default)", path)
  bits = fmt.bits
  if bits not in SUPPORTED_BITS:
    raise CompressionError(
        f"{bits}-bit codes: GPTQ packs {SUPPORTED_BITS} bits only", path)
  k, n = q.shape
  word = 32 // math.gcd(32, bits)
  if k % word or n % word:
    raise CompressionError(
        f"shape ({k}, {n}): GPTQ packs {bits}-bit codes into whole int32 "
        f"words, so in_features and out_features must be multiples of "
        f"{word}; skip this layer with a rule when quantizing", path)
  half, top = 1 << (bits - 1), (1 << bits) - 1
  codes, scale, w = (np.asarray(a) for a in _dense_parts(q))
  codes = codes.astype(np.float64)
  groups = scale.shape[0]
  gsize = k // groups
  scale = np.broadcast_to(scale, (groups, n))
  if q.zero is None:
    shift, z = half, np.full((groups, n), half, np.int64)
  else:
    shift = 0 if fmt.qmin >= 0 else half
    z = np.broadcast_to(np.asarray(q.zero, np.int64), (groups, n)) + shift
  u = codes + shift
  if np.any(u != np.round(u)) or u.min() < 0 or u.max() > top:
    raise CompressionError(
        f"codes span [{codes.min():g}, {codes.max():g}], which no {bits}-bit "
        "unsigned GPTQ code holds after the zero-point shift", path)
  if z.min() < 0 or z.max() > top:
    raise CompressionError(f"zero points outside [0, {top}]", path)
  if checkpoint_format == "gptq" and np.any(z == 0):
    raise CompressionError(
        f"{int(np.sum(z == 0))} groups have zero point 0, which the GPTQ v1 "
        "format (it stores zero - 1) cannot hold; export with "
        "checkpoint_format='gptq_v2' (GPTQModel, vLLM) or quantize "
        "symmetrically", path)
  s16 = scale.astype(np.float16)
  if np.any(~np.isfinite(s16) | ((s16 == 0) & (scale != 0))):
    raise CompressionError(
        f"scales in [{scale.min():g}, {scale.max():g}] overflow or flush to "
        "zero in float16, the GPTQ scale type", path)
  s32 = s16.astype(np.float32)
  # The exported weight, as materialize() forms it (float32, then q.dtype).
  w_gptq = ((u.astype(np.float32) - np.repeat(z, gsize, 0).astype(np.float32))
            * np.repeat(s32, gsize, 0))
  w_gptq = w_gptq.astype(jnp.dtype(q.dtype)).astype(np.float32)
  diff = w_gptq - w.astype(np.float32)
  norm = float(np.linalg.norm(w))
  rep = LayerExport(
      module=module, path=path, bits=bits,
      group_size=-1 if groups == 1 else gsize,
      sym=bool(np.all(z == half)),
      scales_exact=bool(np.array_equal(s32, scale)),
      max_abs_error=float(np.max(np.abs(diff), initial=0.0)),
      rel_error=float(np.linalg.norm(diff)) / norm if norm else 0.0)
  stored_z = z - (1 if checkpoint_format == "gptq" else 0)
  tensors = {
      f"{module}.qweight": pack_int32(u.astype(np.uint8), bits, 0),
      f"{module}.qzeros": pack_int32(stored_z.astype(np.uint8), bits, 1),
      f"{module}.scales": np.ascontiguousarray(s16),
      f"{module}.g_idx": (np.arange(k) // gsize).astype(np.int32),
  }
  return tensors, rep


def _refusal(leaf) -> str:
  name = type(leaf).__name__
  if isinstance(leaf, InputTransform):
    why = ("an input transform changes the layer's input, which a GPTQ "
           "Linear cannot; fold it into the previous layer or materialize it")
  else:
    why = ("GPTQ stores dense integer codes with per-group scales and zero "
           "points only; materialize this param (cj.materialize_tree) to "
           "export it as float")
  return f"a {name} leaf has no GPTQ form: {why}"


def save_gptq(path, model, compressed_variables, *,
              checkpoint_format: str = "gptq", inexact_scales: str = "warn",
              dtype="float16", tokenizer=None, max_shard_size=None
              ) -> GPTQReport:
  """Writes a GPTQ checkpoint directory (module doc).

  Args:
    model: a `hub.Pretrained`, or (family, config) of the compressed tree.
    compressed_variables: the zoo tree with QArray Linear kernels.
    checkpoint_format: "gptq" (v1: zeros stored minus one) or "gptq_v2".
    inexact_scales: "warn" or "error" when scales are not float16 values.
    dtype: float params (norms, embeddings, biases, unquantized layers).
    tokenizer: written beside (default: the Pretrained's).
    max_shard_size: as in `hub.save_pretrained`.
  Returns a GPTQReport (per-layer bits, group size, symmetry, scale error).
  """
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise CompressionError(f"checkpoint_format {checkpoint_format!r}: use one "
                           f"of {CHECKPOINT_FORMATS}")
  if inexact_scales not in ("warn", "error"):
    raise CompressionError(f"inexact_scales {inexact_scales!r}: use 'warn' or "
                           "'error'")
  path = pathlib.Path(path)
  family, config, _, raw, tok, source = hub.unpack_model(model)
  float_dtype = hub.target_dtype(dtype)
  tensors: dict[str, np.ndarray] = {}
  layers: list[LayerExport] = []
  float_linears: list[str] = []
  for spec, leaf in hf.hf_leaves(family, config, compressed_variables):
    linear = _is_linear(spec, leaf)
    if not is_compressed(leaf):
      a = np.asarray(spec.to_hf(np.asarray(leaf)))
      if float_dtype is not None and is_float_dtype(a.dtype):
        a = a.astype(float_dtype)
      tensors[spec.hf] = np.ascontiguousarray(a)
      if linear and spec.hf.endswith(".weight"):
        float_linears.append(spec.hf[:-len(".weight")])
      continue
    if not isinstance(leaf, QArray):
      raise CompressionError(_refusal(leaf), spec.path)
    if not linear or not spec.hf.endswith(".weight"):
      raise CompressionError(
          f"HF tensor {spec.hf!r} is not a Linear weight (an embedding, norm "
          "or convolution): GPTQ quantizes Linear layers only; skip it with a "
          "rule when quantizing, or materialize it", spec.path)
    t, rep = _layer(spec.hf[:-len(".weight")], spec.path, leaf,
                    checkpoint_format)
    tensors.update(t)
    layers.append(rep)
  if not layers:
    raise CompressionError(
        "the tree has no quantized Linear weight; quantize it first (e.g. "
        "cj.quantize(variables, 4, group_size=128, scale_dtype=jnp.float16)) "
        "or write a float model with save_pretrained")
  kinds = sorted({(l.bits, l.group_size) for l in layers})
  if len(kinds) > 1:
    eg = {k: next(l.path for l in layers if (l.bits, l.group_size) == k)
          for k in kinds}
    raise CompressionError(
        "a GPTQ checkpoint has one bits / group_size; this tree mixes "
        + ", ".join(f"{b} bits / group {g} (e.g. {eg[(b, g)]})"
                    for b, g in kinds)
        + "; quantize every exported layer alike")
  inexact = [l for l in layers if not l.scales_exact]
  if inexact:
    worst = max(inexact, key=lambda l: l.rel_error)
    msg = (f"{len(inexact)} of {len(layers)} layers have scales that are not "
           f"float16 values (GPTQ stores float16 scales); rounded, the worst "
           f"layer {worst.path} has relative weight error "
           f"{worst.rel_error:.3g} (max abs {worst.max_abs_error:.3g}); "
           "quantize with scale_dtype=jnp.float16 for an exact export")
    if inexact_scales == "error":
      raise CompressionError(msg)
    warnings.warn(msg, stacklevel=2)
  bits, group_size = kinds[0]
  qcfg: dict[str, Any] = {
      "quant_method": "gptq", "bits": bits, "group_size": group_size,
      "desc_act": False, "sym": all(l.sym for l in layers),
      "static_groups": False, "true_sequential": True,
      "lm_head": any(l.module.split(".")[-1] == "lm_head" for l in layers),
      "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
      "model_file_base_name": "model",
      "meta": {"quantizer": ["compressjax"]},
  }
  skipped = [m for m in float_linears if m.split(".")[-1] != "lm_head"]
  if skipped:
    qcfg["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in skipped}
  files = hub.write_weights(path, tensors, max_shard_size)
  hub.write_json(path / hub.CONFIG, {
      **hub.hf_config_of(family, config, raw, "float16" if float_dtype is None
                         else float_dtype.name),
      "quantization_config": qcfg})
  hub.write_json(path / QUANTIZE_CONFIG, qcfg)
  hub.copy_extras(source, path)
  tok = tokenizer if tokenizer is not None else tok
  if tok is not None:
    tok.save(path)
  return GPTQReport(tuple(layers), qcfg, tuple(files))
