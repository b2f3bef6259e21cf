"""A byte-level text corpus made of the Python standard library's own source.

Every Python install ships these files, so nothing is downloaded. But their
bytes change between patch releases (21 of the 50 files differ between 3.11.2
and 3.11.7, among them the validation file calendar.py), so results would
depend on the Python that happens to be installed. The default source is
therefore a pinned snapshot of the files from CPython 3.11.7 that ships with
this package (`stdlib_3_11_7.tar.xz`, 350 KB, with the PSF license; its
sha256 is checked on load): the same bytes on every machine and Python
version. `source="installed"` reads this Python's own files instead (the
cache keys of the experiments hash the bytes, so that simply retrains).

The module list is fixed: pure-python top-level modules present in CPython
3.11, 3.12 and 3.13 (checked), read in sorted order. Files are joined with a
NUL byte, which never occurs in source text, as a document boundary.

The split is by file: the modules named in `val_files` form the validation set
and all others the training set, so no validation byte comes from a file seen
in training.

  train, val = stdlib_text.load(max_bytes=2_000_000)
  for batch in train_batches(train, seq_len=128, batch_size=32, seed=0): ...
  for batch in eval_batches(val, seq_len=128, batch_size=64): ...

Batches are uint8 arrays of shape (batch, seq_len + 1): inputs are
`batch[:, :-1]` and next-byte targets `batch[:, 1:]`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import tarfile
from typing import Iterator, Sequence

import numpy as np

# Sorted; every name is a single-file module in CPython 3.11, 3.12 and 3.13
# (no packages, nothing removed by PEP 594 or turned into a package).
MODULES: tuple[str, ...] = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py",
    "calendar.py", "cmd.py", "codecs.py", "colorsys.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py",
    "difflib.py", "dis.py", "enum.py", "filecmp.py", "fnmatch.py",
    "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py",
    "gzip.py", "heapq.py", "hmac.py", "inspect.py", "ipaddress.py",
    "linecache.py", "numbers.py", "operator.py", "optparse.py", "pprint.py",
    "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py",
    "string.py", "tempfile.py", "textwrap.py", "threading.py", "tokenize.py",
    "traceback.py", "types.py", "typing.py", "warnings.py", "weakref.py",
)

# A mix of styles (date arithmetic, numerics, threading, text, lexing).
DEFAULT_VAL_FILES: tuple[str, ...] = (
    "calendar.py", "fractions.py", "queue.py", "textwrap.py", "tokenize.py")

SEPARATOR = b"\x00"
VOCAB_SIZE = 256

# The pinned snapshot: MODULES and LICENSE.txt of CPython SNAPSHOT_VERSION.
SNAPSHOT_VERSION = "3.11.7"
SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "stdlib_3_11_7.tar.xz")
SNAPSHOT_SHA256 = ("e802df7827c82d3ebe72ebe8478ca859"
                   "3bf3897b1f5f854f7d304c3325f3db5b")
SOURCES = ("snapshot", "installed")


def stdlib_dir() -> str:
  return os.path.dirname(os.__file__)


def _parse_names(names: str | Sequence[str] | None) -> tuple[str, ...]:
  if names is None:
    return ()
  if isinstance(names, str):
    names = names.split(",")
  return tuple(n.strip() for n in names if n.strip())


def _installed(name: str, root: str | None = None) -> bytes:
  path = os.path.join(root or stdlib_dir(), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"standard-library source file {path!r} not found; this dataset needs "
        "the pure-python stdlib sources (some distributions ship only .pyc: "
        "install the python3 source/full package, or use a pyenv/venv Python)")
  with open(path, "rb") as f:
    return f.read()


@functools.lru_cache(maxsize=1)
def _snapshot_files() -> dict[str, bytes]:
  if not os.path.isfile(SNAPSHOT):
    raise FileNotFoundError(
        f"the pinned stdlib snapshot {SNAPSHOT!r} is missing (a wheel built "
        "without package data?); reinstall compressjax from source, or pass "
        "source='installed' to read this Python's own stdlib files")
  with open(SNAPSHOT, "rb") as f:
    blob = f.read()
  digest = hashlib.sha256(blob).hexdigest()
  if digest != SNAPSHOT_SHA256:
    raise ValueError(f"{SNAPSHOT} is corrupt: sha256 {digest}, expected "
                     f"{SNAPSHOT_SHA256}; restore it from the repository")
  with tarfile.open(fileobj=io.BytesIO(blob), mode="r:xz") as tar:
    return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
            if m.isfile()}


def read_module(name: str, root: str | None = None,
                source: str = "snapshot") -> bytes:
  """Bytes of one standard-library source file from `root` (a directory) if
  given, else from `source`: "snapshot" (pinned CPython 3.11.7 files) or
  "installed" (this Python's stdlib). Clear error if missing."""
  if root is not None or source == "installed":
    return _installed(name, root)
  if source != "snapshot":
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  files = _snapshot_files()
  if name not in files:
    raise FileNotFoundError(
        f"{name!r} is not in the pinned stdlib snapshot (it holds "
        "compressjax.data.stdlib_text.MODULES); use source='installed' for "
        "other modules")
  return files[name]


def write_snapshot(path: str, root: str | None = None,
                   modules: Sequence[str] = MODULES) -> str:
  """Writes `modules` (and the LICENSE.txt next to them, when present) from
  `root` (default: this Python's stdlib) to a reproducible .tar.xz (sorted,
  zero mtimes and owners); returns its sha256. How SNAPSHOT was made:
  write_snapshot(SNAPSHOT, <CPython 3.11.7's lib/python3.11>)."""
  import lzma
  root = root or stdlib_dir()
  names = sorted(modules)
  if os.path.isfile(os.path.join(root, "LICENSE.txt")):
    names.append("LICENSE.txt")
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for name in names:
      data = _installed(name, root)
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), 0, 0o644
      tar.addfile(info, io.BytesIO(data))
  blob = lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)
  with open(path, "wb") as f:
    f.write(blob)
  return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass(frozen=True)
class Split:
  """Which files went where, and a digest of the bytes (for cache keys)."""

  train_files: tuple[str, ...]
  val_files: tuple[str, ...]
  digest: str


def _join(names: Sequence[str], root: str | None, source: str,
          max_bytes: int | None) -> np.ndarray:
  parts = []
  for n in names:
    parts += [read_module(n, root, source), SEPARATOR]
  data = b"".join(parts)
  if max_bytes is not None and max_bytes > 0:
    data = data[:max_bytes]
  return np.frombuffer(data, np.uint8).copy()


def load(max_bytes: int | None = 2_000_000, max_val_bytes: int | None = None,
         val_files: str | Sequence[str] | None = DEFAULT_VAL_FILES,
         modules: Sequence[str] = MODULES, root: str | None = None,
         return_split: bool = False, source: str = "snapshot"):
  """Returns (train, val) uint8 arrays [and a `Split` if return_split].

  Args:
    max_bytes: cap on the training bytes (files are read in sorted order and
      the concatenation is truncated); None or 0 for no cap.
    max_val_bytes: the same cap for the validation bytes.
    val_files: names (or one comma-separated string) held out for validation;
      each must be in `modules`.
    modules: the file names to use (default: the fixed `MODULES`).
    root: a directory holding them (overrides `source`).
    source: "snapshot" (the pinned CPython 3.11.7 files: the same bytes
      everywhere) or "installed" (this Python's stdlib).
  """
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  modules = tuple(sorted(modules))
  val = _parse_names(val_files)
  unknown = sorted(set(val) - set(modules))
  if unknown:
    raise ValueError(f"validation files {unknown} are not in the module list; "
                     f"choose from {list(modules)}")
  train_names = tuple(n for n in modules if n not in val)
  val_names = tuple(n for n in modules if n in val)
  if not train_names or not val_names:
    raise ValueError("need at least one training and one validation file")
  train = _join(train_names, root, source, max_bytes)
  valid = _join(val_names, root, source, max_val_bytes)
  if not return_split:
    return train, valid
  h = hashlib.sha256()
  for name, arr in (("train", train), ("val", valid)):
    h.update(name.encode())
    h.update(len(arr).to_bytes(8, "little"))
    h.update(arr.tobytes())
  return train, valid, Split(train_names, val_names, h.hexdigest())


def train_batches(data: np.ndarray, seq_len: int, batch_size: int,
                  seed: int = 0) -> Iterator[np.ndarray]:
  """Endless (batch, seq_len + 1) random windows; deterministic given seed."""
  n = len(data) - seq_len - 1
  if n <= 0:
    raise ValueError(f"training data has {len(data)} bytes, fewer than "
                     f"seq_len + 2 = {seq_len + 2}")
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, n + 1, size=batch_size)
    yield data[starts[:, None] + offsets]


def num_eval_windows(data: np.ndarray, seq_len: int) -> int:
  return max(0, (len(data) - 1) // seq_len)


def eval_batches(data: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[np.ndarray]:
  """Non-overlapping (batch, seq_len + 1) validation windows.

  Window i covers bytes [i * seq_len, (i + 1) * seq_len]: consecutive windows
  share one byte (the last target of one is the first input of the next), so
  no byte is predicted twice. Only full batches are yielded (fixed shapes, one
  compilation), at most `max_batches`; the windows they hold are spread
  evenly over the whole validation set, so every held-out file contributes
  even under a small cap. Deterministic, in order, all distinct.
  """
  windows = num_eval_windows(data, seq_len)
  n_batches = windows // batch_size
  if max_batches:
    n_batches = min(n_batches, max_batches)
  if n_batches == 0:
    raise ValueError(f"validation data ({len(data)} bytes) is too small for "
                     f"one batch of {batch_size} windows of {seq_len}")
  k = n_batches * batch_size
  chosen = np.arange(k) * windows // k  # strictly increasing since k <= windows
  offsets = np.arange(seq_len + 1)
  for b in range(n_batches):
    starts = chosen[b * batch_size:(b + 1) * batch_size] * seq_len
    yield data[starts[:, None] + offsets]
