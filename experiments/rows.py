r"""The rows of the compression tables: one `Row` per compressed model.

A row's name states its settings and is parsed, so it cannot disagree with
what the row does: `int4_g128` is RTN at 4 bits in groups of 128 inputs,
`int3_g128` the same at 3 bits, `gptq_int3_g32_seq` sequential GPTQ at 3 bits
in groups of 32, `nm_2_4+int4` magnitude 2:4 then int4, `rigl_90` RigL to 90%.
Settings a name does not state come from the config (head bits, calibration
size, rank ratios, the fine-tuning budget, ...) and every row's description
spells all of them out. `rows.make("int3_g128", config)` builds one row;
`rows.parse(config.methods, config)` a table's worth. `families()` lists the
name patterns with an example each.

A `Row` has one call signature: `build(ctx) -> Transform | compressed tree`,
`ctx` an `experiments.harness.Context` (the config, the task's model and float
baseline, lazily computed calibration statistics, the task's structure hooks).
`needs` says what beyond the baseline it uses: "stats" (one-shot calibration
statistics), "calib" (runs the model on calibration inputs itself: sequential
and rotation rows), "training" (fine-tunes: `experiments.recipes`), and
"scale_groups" / "rotation_plan" (where scales and rotations fold: the task's
model structure). Adding a row kind is one `@family` function here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax

import compressjax as cj
from compressjax.calibrate import sequential
from compressjax.quantization.awq import awq
from compressjax.quantization.gptq import gptq
from compressjax.quantization.rotation import quarot, rotation_gptq
from compressjax.quantization.smoothquant import smoothquant
from compressjax.train import reconstruct
from experiments import recipes
from experiments.harness import Context

T = cj.transforms

NEEDS = frozenset({"stats", "calib", "training", "scale_groups",
                   "rotation_plan"})


@dataclasses.dataclass(frozen=True)
class Row:
  """One compressed model of a table."""

  name: str
  description: str
  build: Callable[[Context], Any]
  needs: frozenset = frozenset()

  def __post_init__(self):
    unknown = set(self.needs) - NEEDS
    if unknown:
      raise ValueError(f"row {self.name}: unknown needs {sorted(unknown)}; "
                       f"use {sorted(NEEDS)}")

  def compress(self, ctx: Context) -> Any:
    """The compressed tree: build(ctx), applied to the baseline when it is a
    Transform."""
    for hook in ("scale_groups", "rotation_plan", "training"):
      if hook in self.needs:
        ctx.require(hook)
    out = self.build(ctx)
    if isinstance(out, cj.Transform):
      out = out.apply(ctx.baseline)
    return out


@dataclasses.dataclass(frozen=True)
class Family:
  pattern: re.Pattern
  example: str
  make: Callable[..., Row]


_FAMILIES: list[Family] = []


def family(pattern: str, example: str):
  """Registers `make(name, config, **groups) -> Row` for names that fully
  match `pattern` (named groups of digits arrive as ints)."""

  def deco(make):
    rx = re.compile(pattern)
    if not rx.fullmatch(example):
      raise ValueError(f"example {example!r} does not match {pattern!r}")
    _FAMILIES.append(Family(rx, example, make))
    return make

  return deco


def families() -> list[tuple[str, str]]:
  """(pattern, example) of every row family, in registration order."""
  return [(f.pattern.pattern, f.example) for f in _FAMILIES]


def make(name: str, c) -> Row:
  """The row called `name` under config `c`."""
  for f in _FAMILIES:
    m = f.pattern.fullmatch(name)
    if m:
      kw = {k: int(v) if v is not None and v.isdigit() else v
            for k, v in m.groupdict().items()}
      return f.make(name, c, **kw)
  raise ValueError(
      f"unknown method {name!r}: row names state their settings; the kinds "
      f"are (example: pattern) " +
      "; ".join(f"{e}: {p}" for p, e in families()))


def parse(spec: str, c) -> list[Row]:
  """Rows of a comma-separated list of names, in order."""
  names = [m.strip() for m in spec.split(",") if m.strip()]
  if len(set(names)) != len(names):
    raise ValueError(f"config.methods names a row twice: {spec!r}")
  return [make(n, c) for n in names]


# ---------------------------------------------------------------------------
# Shared settings
# ---------------------------------------------------------------------------

def _check(name: str, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"row {name!r}: {what}")


def _bits(name, bits):
  _check(name, 2 <= bits <= 8, f"integer bits must be in [2, 8], got {bits}")
  return bits


def _pct(name, pct):
  _check(name, 0 < pct < 100, f"sparsity must be 1..99 percent, got {pct}")
  return pct / 100


def _nm(name, n, m):
  _check(name, 0 < n < m, f"N:M needs 0 < N < M, got {n}:{m}")
  return n, m


def head_rules(ctx: Context, bits: int) -> list:
  """Rows below config.quant.head_bits keep the output head at head_bits,
  per output channel, or float when head_bits >= 16 (first and last layers
  at 8 bits is common practice; the embedding is not compressed at all: the
  default filter excludes it)."""
  hb, head = ctx.config.quant.head_bits, ctx.task.head
  if not hb or bits >= hb or head is None:
    return []
  if hb >= 16:  # the head stays float (GPTQ's protocol for LLMs)
    return [(head, None)]
  return [(head, dict(bits=hb, format=None, group_size=None))]


def _head_note(c, bits: int) -> str:
  hb = c.quant.head_bits
  if not hb or bits >= hb:
    return ""
  return "; head float" if hb >= 16 else f"; head int{hb} per channel"


def sparse_rules(ctx: Context) -> list:
  """Sparsity rows leave the head dense unless config.sparsity.prune_head.

  As in SparseGPT and Wanda, which prune only the blocks' linear layers. Here
  it matters a lot: the head columns of bytes that never occur carry large
  weights, so one per-layer magnitude threshold strips the columns of common
  bytes almost bare (val ppl ~5.5 -> ~34 with 50% unstructured).
  """
  head = ctx.task.head
  return [] if ctx.config.sparsity.prune_head or head is None else [
      (head, None)]


def _sparse_note(c) -> str:
  return "" if c.sparsity.prune_head else "; head not pruned"


def _nm_group(c, n: int, m: int) -> int | None:
  """Group size over the kept N:M values covering config.quant.group_size
  dense inputs. 2:4 halves the kept axis (128 -> 64), so a group of 128 no
  longer divides it; n/m of it does. Per channel when that is not whole."""
  g = c.quant.group_size
  if not g or (g * n) % m:
    return None
  return g * n // m


def _group_note(g) -> str:
  return "per channel" if g is None else f"groups of {g}"


# ---------------------------------------------------------------------------
# Data-free rows
# ---------------------------------------------------------------------------

@family(r"float32", "float32")
def _float(name, c):
  return Row(name, "float32 baseline, nothing compressed",
             lambda ctx: cj.chain())


@family(r"int(?P<bits>\d+)", "int8")
def _rtn_channel(name, c, bits):
  _bits(name, bits)
  return Row(name, f"int{bits} RTN, symmetric, per output channel"
             f"{_head_note(c, bits)}",
             lambda ctx: T.quantize(bits, rules=head_rules(ctx, bits)))


@family(r"int(?P<bits>\d+)_g(?P<group>\d+)", "int4_g128")
def _rtn_group(name, c, bits, group):
  _bits(name, bits)
  return Row(name, f"int{bits} RTN, symmetric, groups of {group} inputs"
             f"{_head_note(c, bits)}",
             lambda ctx: T.quantize(bits, group_size=group,
                                    rules=head_rules(ctx, bits)))


@family(r"unstructured_(?P<pct>\d+)", "unstructured_50")
def _magnitude(name, c, pct):
  s = _pct(name, pct)
  return Row(name, f"magnitude pruning, {pct}% unstructured per layer"
             f"{_sparse_note(c)}",
             lambda ctx: T.sparsify(s, rules=sparse_rules(ctx)))


@family(r"nm_(?P<n>\d+)_(?P<m>\d+)", "nm_2_4")
def _magnitude_nm(name, c, n, m):
  _nm(name, n, m)
  return Row(name, f"magnitude {n}:{m} along inputs{_sparse_note(c)}",
             lambda ctx: _nm_transform(ctx, n, m))


def _nm_transform(ctx, n, m):
  return T.sparsify(pattern="nm", n=n, m=m, rules=sparse_rules(ctx))


@family(r"nm_(?P<n>\d+)_(?P<m>\d+)\+int(?P<bits>\d+)", "nm_2_4+int4")
def _magnitude_nm_rtn(name, c, n, m, bits):
  _nm(name, n, m)
  _bits(name, bits)
  g = _nm_group(c, n, m)
  return Row(
      name, f"{n}:{m} then int{bits} RTN of the kept values, "
      f"{_group_note(g)}{_sparse_note(c)}{_head_note(c, bits)}",
      lambda ctx: cj.chain(_nm_transform(ctx, n, m),
                           T.quantize(bits, group_size=g,
                                      rules=head_rules(ctx, bits))))


@family(r"lowrank", "lowrank")
def _svd(name, c):
  r = c.lowrank.rank_ratio
  return Row(name, f"truncated SVD, rank ratio {r} of each kernel's "
             "parameters", lambda ctx: T.low_rank(rank_ratio=r))


# Element formats (compressjax.formats): format name -> (bits for the head
# rule, group size from the config or None, description).
_FORMATS = {
    "ternary": (2, None, "ternary {{-1,0,1}} x per-channel scale (TWN "
                "threshold), 2-bit codes"),
    "nf4": (4, "nf4_group_size", "NF4 (QLoRA levels), absmax blocks of {g}"),
    "fp8_e4m3": (8, None, "fp8 e4m3fn elements, float32 scale per output "
                 "channel"),
    "mxfp4": (4, None, "OCP MXFP4: e2m1 elements, E8M0 scale per 32 inputs"),
    "nvfp4": (4, None, "NVFP4: e2m1 elements, e4m3 scale per 16 inputs, f32 "
              "tensor scale"),
    "codebook3": (3, "group_size", "3-bit Lloyd codebook per {g} input rows"),
}


@family(r"(?P<fmt>" + "|".join(_FORMATS) + ")", "nf4")
def _format(name, c, fmt):
  bits, group_key, text = _FORMATS[fmt]
  g = c.quant[group_key] if group_key else None
  return Row(name, text.format(g=g) + _head_note(c, bits),
             lambda ctx: T.quantize(format=fmt, group_size=g,
                                    rules=head_rules(ctx, bits)))


# ---------------------------------------------------------------------------
# Calibrated rows (one-shot: every layer sees the float model's activations
# on config.calib windows, drawn once per run)
# ---------------------------------------------------------------------------

_STATS = frozenset({"stats"})


@family(r"gptq_int(?P<bits>\d+)_g(?P<group>\d+)(?P<seq>_seq)?",
        "gptq_int4_g128")
def _gptq(name, c, bits, group, seq):
  _bits(name, bits)

  # scales stored in config.quant.gptq_scale_dtype (float16: exactly what a
  # GPTQ checkpoint holds, compress_hf's export)
  sd = c.quant.get("gptq_scale_dtype", "float32")
  sd_note = "" if sd == "float32" else f", {sd} scales"

  def build_for(ctx):
    return lambda stats: gptq(stats, bits, group_size=group,
                              scale_dtype=sd, rules=head_rules(ctx, bits))

  if seq:
    return Row(
        name, f"GPTQ int{bits}, groups of {group}{sd_note}, sequential: each "
        f"block calibrated on the compressed blocks before it"
        f"{_head_note(c, bits)}",
        lambda ctx: sequential(ctx.model, ctx.baseline, ctx.calib_inputs,
                               build_for(ctx), progress=ctx.log),
        frozenset({"calib"}))
  return Row(name, f"GPTQ int{bits}, groups of {group}{sd_note}, one-shot "
             f"calibration{_head_note(c, bits)}",
             lambda ctx: build_for(ctx)(ctx.stats), _STATS)


@family(r"sparsegpt_(?P<pct>\d+)", "sparsegpt_50")
def _sparsegpt(name, c, pct):
  s = _pct(name, pct)
  return Row(name, f"SparseGPT {pct}% unstructured (OBS update, mask per 128 "
             f"columns), one-shot{_sparse_note(c)}",
             lambda ctx: T.sparsegpt(ctx.stats, s, rules=sparse_rules(ctx)),
             _STATS)


@family(r"sparsegpt_(?P<n>\d+)_(?P<m>\d+)", "sparsegpt_2_4")
def _sparsegpt_nm(name, c, n, m):
  _nm(name, n, m)
  return Row(name, f"SparseGPT {n}:{m}, one-shot{_sparse_note(c)}",
             lambda ctx: T.sparsegpt(ctx.stats, pattern="nm", n=n, m=m,
                                     rules=sparse_rules(ctx)), _STATS)


@family(r"sparsegpt_(?P<n>\d+)_(?P<m>\d+)\+int(?P<bits>\d+)",
        "sparsegpt_2_4+int4")
def _sparsegpt_nm_q(name, c, n, m, bits):
  _nm(name, n, m)
  _bits(name, bits)
  g = _nm_group(c, n, m)
  return Row(
      name, f"SparseGPT {n}:{m} with joint int{bits} quantization in the "
      f"same pass, {_group_note(g)} kept values{_sparse_note(c)}",
      lambda ctx: T.sparsegpt(ctx.stats, pattern="nm", n=n, m=m, bits=bits,
                              group_size=g, rules=sparse_rules(ctx)),
      _STATS)


@family(r"wanda_(?P<pct>\d+)", "wanda_50")
def _wanda(name, c, pct):
  s = _pct(name, pct)
  return Row(name, f"Wanda {pct}% unstructured, |W|*||X|| per output, no "
             f"update{_sparse_note(c)}",
             lambda ctx: T.wanda(ctx.stats, s, rules=sparse_rules(ctx)),
             _STATS)


@family(r"wanda_(?P<n>\d+)_(?P<m>\d+)", "wanda_2_4")
def _wanda_nm(name, c, n, m):
  _nm(name, n, m)
  return Row(name, f"Wanda {n}:{m}{_sparse_note(c)}",
             lambda ctx: T.wanda(ctx.stats, pattern="nm", n=n, m=m,
                                 rules=sparse_rules(ctx)), _STATS)


@family(r"asvd", "asvd")
def _asvd(name, c):
  r = c.lowrank.rank_ratio
  return Row(name, f"ASVD (mean|x|^0.5 input scaling), rank ratio {r}",
             lambda ctx: T.asvd(ctx.stats, rank_ratio=r), _STATS)


@family(r"svd_llm", "svd_llm")
def _svd_llm(name, c):
  r = c.lowrank.rank_ratio
  return Row(name, f"SVD-LLM (Cholesky whitening of X^T X), rank ratio {r}",
             lambda ctx: T.svd_llm(ctx.stats, rank_ratio=r), _STATS)


@family(r"svd_llm\+int(?P<bits>\d+)_res", "svd_llm+int4_res")
def _svd_llm_res(name, c, bits):
  _bits(name, bits)
  r, g = c.lowrank.residual_rank_ratio, c.quant.group_size
  return Row(
      name, f"SVD-LLM rank ratio {r} (float factors) plus the residual in "
      f"int{bits} RTN, {_group_note(g)}{_head_note(c, bits)}",
      lambda ctx: cj.chain(
          T.svd_llm(ctx.stats, rank_ratio=r, residual=True),
          T.quantize(bits, group_size=g, rules=head_rules(ctx, bits))),
      _STATS)


@family(r"awq_int(?P<bits>\d+)_g(?P<group>\d+)", "awq_int4_g128")
def _awq(name, c, bits, group):
  """Symmetric, the format of the RTN rows it is compared with (same QArrays,
  same bits/w): AWQ's search then starts from exactly the int{bits}_g{group}
  row (alpha = 0, no clip) and keeps what lowers each layer's output error.
  With zero points (the paper's setting) the int4 row lost to symmetric RTN
  on this model at 3 seeds x 3 calibration draws: asymmetric int4 RTN itself
  is worse end to end here (5.435 vs 5.394 at seed 0) although its per-layer
  output error is ~28% lower: the key projections are the sensitive layers
  (int4 on the keys alone: +0.020 ppl symmetric, +0.037 asymmetric)."""
  _bits(name, bits)
  return Row(
      name, f"AWQ int{bits} symmetric, groups of {group}: alpha grid + clip "
      "search, scales folded into LayerNorm/value where possible"
      f"{_head_note(c, bits)}",
      lambda ctx: awq(ctx.stats, bits, group_size=group, symmetric=True,
                      groups=ctx.task.scale_groups,
                      rules=head_rules(ctx, bits)),
      frozenset({"stats", "scale_groups"}))


@family(r"smoothquant_w8a8", "smoothquant_w8a8")
def _smoothquant(name, c):
  a = c.quant.smooth_alpha
  return Row(name, f"SmoothQuant alpha {a}: int8 per-channel weights x int8 "
             "per-token activations (int32 accumulation)",
             lambda ctx: smoothquant(ctx.stats, a,
                                     groups=ctx.task.scale_groups),
             frozenset({"stats", "scale_groups"}))


@family(r"rotation_gptq_int(?P<bits>\d+)_g(?P<group>\d+)",
        "rotation_gptq_int4_g128")
def _rotation_gptq(name, c, bits, group):
  _bits(name, bits)
  return Row(
      name, "randomized Hadamard (value/out folded, online before out and "
      f"fc2) then GPTQ int{bits}, groups of {group}{_head_note(c, bits)}",
      lambda ctx: rotation_gptq(
          quarot(jax.random.key(ctx.config.seed), ctx.task.rotation_plan,
                 residual=False),
          ctx.model, ctx.calib_inputs, bits, group_size=group,
          rules=head_rules(ctx, bits)),
      frozenset({"calib", "rotation_plan"}))


# ---------------------------------------------------------------------------
# Training rows (experiments.recipes, config.finetune's budget, from the
# float baseline; cached in the workdir)
# ---------------------------------------------------------------------------

_TRAIN = frozenset({"training"})


def _steps(c) -> str:
  return f"{c.finetune.steps} steps"


@family(r"float32_ft", "float32_ft")
def _float_ft(name, c):
  return Row(name, f"control: the float model fine-tuned {_steps(c)} with "
             "the training rows' optimizer and data (no compression)",
             lambda ctx: recipes.float_recipe(ctx, name)[0], _TRAIN)


@family(r"qat_int(?P<bits>\d+)_g(?P<group>\d+)", "qat_int4_g128")
def _qat(name, c, bits, group):
  _bits(name, bits)
  return Row(
      name, f"QAT (LSQ steps from the PTQ scales, learned in log space; "
      f"straight-through) int{bits} g{group}, {_steps(c)} from the float "
      "model, exported to QArray"
      f"{_head_note(c, bits)}",
      lambda ctx: recipes.qat_recipe(ctx, name, bits=bits, group_size=group,
                                     rules=head_rules(ctx, bits))[0], _TRAIN)


@family(r"qat_ternary", "qat_ternary")
def _qat_ternary(name, c):
  return Row(
      name, f"QAT ternary per channel (learned scale), {_steps(c)}"
      f"{_head_note(c, 2)}",
      lambda ctx: recipes.qat_recipe(ctx, name, format="ternary",
                                     rules=head_rules(ctx, 2))[0], _TRAIN)


@family(r"kd_(?P<n>\d+)_(?P<m>\d+)", "kd_2_4")
def _kd(name, c, n, m):
  _nm(name, n, m)
  f = c.finetune
  return Row(
      name, f"magnitude {n}:{m}, kept values recovered by logit distillation "
      f"from the float model (T {f.temperature}, alpha {f.alpha}), "
      f"{_steps(c)}{_sparse_note(c)}",
      lambda ctx: recipes.distill_recipe(
          ctx, name, student=_nm_transform(ctx, n, m),
          student_name=f"nm_{n}_{m}")[0], _TRAIN)


@family(r"(?P<method>rigl|set)_(?P<pct>\d+)", "rigl_90")
def _rigl(name, c, method, pct):
  s, f = _pct(name, pct), c.finetune
  how = "by gradient" if method == "rigl" else "at random"
  return Row(
      name, f"{method.upper() if method == 'set' else 'RigL'} {pct}% "
      f"({f.distribution}): magnitude masks, then drop/regrow {how} every "
      f"{f.update_every} steps, {_steps(c)}{_sparse_note(c)}",
      lambda ctx: recipes.sparse_recipe(ctx, name, method, s,
                                        rules=sparse_rules(ctx))[0], _TRAIN)


@family(r"gmp_(?P<pct>\d+)", "gmp_90")
def _gmp(name, c, pct):
  s = _pct(name, pct)
  return Row(
      name, f"gradual magnitude pruning to {pct}% (cubic schedule), "
      f"{_steps(c)}{_sparse_note(c)}",
      lambda ctx: recipes.sparse_recipe(ctx, name, "gmp", s,
                                        rules=sparse_rules(ctx))[0], _TRAIN)


# ---------------------------------------------------------------------------
# Adapters on compressed bases (compressjax.train.adapters; recipes.
# adapter_recipe: config.finetune's budget at config.adapters.learning_rate,
# only the adapters trained) and learned rounding / clipping
# (compressjax.train.reconstruct, per layer from one-shot statistics)
# ---------------------------------------------------------------------------

def _rank(name, rank):
  _check(name, rank >= 1, f"adapter rank must be >= 1, got {rank}")
  return rank


def _adapter_note(c, rank: int) -> str:
  a = c.adapters
  return (f"rank-{rank} adapters (alpha {a.alpha}) on every kernel, kept "
          f"separate (float32), {_steps(c)} at lr {a.learning_rate}")


@family(r"lora_r(?P<rank>\d+)", "lora_r8")
def _lora(name, c, rank):
  _rank(name, rank)
  return Row(
      name, f"control: LoRA on the float model, {_adapter_note(c, rank)}",
      lambda ctx: recipes.adapter_recipe(
          ctx, name, rank=rank, alpha=c.adapters.alpha)[0], _TRAIN)


def _adapter_head(ctx: Context, bits: int) -> list:
  """head_rules with the quantizer options lora takes (a float head keeps
  its adapter: the rule leaves the base float)."""
  return [(p, dict(cfg or dict(bits=None, format=None, group_size=None),
                   double_quant=False)) for p, cfg in head_rules(ctx, bits)]


def _reconstruct_head(ctx: Context, bits: int) -> list:
  """head_rules with the options reconstruct takes (None: the head float)."""
  return [(p, cfg and dict(bits=cfg["bits"], group_size=None))
          for p, cfg in head_rules(ctx, bits)]


@family(r"qlora_nf4_r(?P<rank>\d+)", "qlora_nf4_r8")
def _qlora(name, c, rank):
  _rank(name, rank)
  g = c.quant.nf4_group_size
  return Row(
      name, f"QLoRA: NF4 base, absmax blocks of {g} with 8-bit double-"
      f"quantized scales, {_adapter_note(c, rank)}{_head_note(c, 4)}",
      lambda ctx: recipes.adapter_recipe(
          ctx, name, rank=rank, alpha=c.adapters.alpha, format="nf4",
          group_size=g, double_quant=True,
          rules=_adapter_head(ctx, 4))[0], _TRAIN)


@family(r"(?P<init>lora|loftq)_int(?P<bits>\d+)_g(?P<group>\d+)_r"
        r"(?P<rank>\d+)", "loftq_int2_g64_r8")
def _lora_int(name, c, init, bits, group, rank):
  _bits(name, bits)
  _rank(name, rank)
  start = (f"LoftQ start ({c.adapters.loftq_iters} alternations of "
           "quantization and SVD of the residual)" if init == "loftq" else
           "standard start (B = 0: the RTN model)")
  return Row(
      name, f"int{bits} RTN base, groups of {group}, {start}, "
      f"{_adapter_note(c, rank)}{_head_note(c, bits)}",
      lambda ctx: recipes.adapter_recipe(
          ctx, name, rank=rank, alpha=c.adapters.alpha, bits=bits,
          group_size=group, iters=c.adapters.loftq_iters,
          init="standard" if init == "lora" else "loftq",
          rules=_adapter_head(ctx, bits))[0], _TRAIN)


_RECON = {"adaround": "AdaRound (learned rounding)",
          "lwc": "OmniQuant learnable weight clipping",
          "lwc_adaround": "OmniQuant clipping, then AdaRound with it"}


def _recon_start(init, method) -> str:
  if init is None:
    return "from RTN"
  return ("from GPTQ's result (same groups, one-shot): " +
          ("its scales and codes" if method == "adaround" else
           "its scales, clipped by LWC, AdaRound from those codes"
           if method == "lwc_adaround" else "its scales"))


@family(r"(?:(?P<init>gptq)_)?(?P<method>adaround|lwc|lwc_adaround)_int"
        r"(?P<bits>\d+)_g(?P<group>\d+)", "adaround_int3_g128")
def _reconstruct(name, c, init, method, bits, group):
  _bits(name, bits)
  it = c.reconstruct.iters

  def build(ctx):
    start = None
    if init == "gptq":
      start = gptq(ctx.stats, bits, group_size=group,
                   rules=head_rules(ctx, bits)).apply(ctx.baseline)
    return reconstruct.reconstruct(
        ctx.stats, bits, group_size=group, method=method.replace("_", "+"),
        iters=it, init=start, rules=_reconstruct_head(ctx, bits))

  return Row(
      name, f"{_RECON[method]} int{bits}, groups of {group}, "
      f"{_recon_start(init, method)}: each layer's output error on one-shot "
      f"calibration, {it} Adam steps per phase{_head_note(c, bits)} "
      "(learned too)", build, _STATS)
