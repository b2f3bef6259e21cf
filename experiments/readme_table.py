r"""Rewrites the README's results table from a run's results.md.

    python -m experiments.readme_table runs/default/results.md \
        [--readme README.md]

The table lives between the markers BEGIN and END (HTML comments, invisible
on GitHub); everything between them is replaced by the selected columns of
results.md's table and a line naming where they came from (the results
header's environment and baseline key), so the README never shows numbers
that no run produced.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

BEGIN = ("<!-- results-table:begin (generated: python -m "
         "experiments.readme_table) -->")
END = "<!-- results-table:end -->"
COLUMNS = ("method", "val ppl", "bits/w (layers)", "bits/w (model)", "ratio")
PROVENANCE = ("environment", "baseline key")


def parse_results(text: str) -> tuple[dict, list[str], list[list[str]]]:
  """(header facts, column names, rows) of a results.md."""
  facts = dict(re.findall(r"^- \*\*(.+?)\*\*: (.*)$", text, re.MULTILINE))
  lines = [ln for ln in text.splitlines() if ln.startswith("|")]
  if len(lines) < 2:
    raise ValueError("no table in results.md (expected '| method | ...' "
                     "lines as experiments.harness writes them)")
  cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]
  return facts, cells(lines[0]), [cells(ln) for ln in lines[2:]]


def table(text: str, columns=COLUMNS) -> str:
  """The README block's contents (without markers) for a results.md."""
  facts, names, rows = parse_results(text)
  missing = [c for c in columns if c not in names]
  if missing:
    raise ValueError(f"results.md has no column(s) {missing}; it has "
                     f"{names}")
  idx = [names.index(c) for c in columns]
  right = lambda c: c != "method"
  out = ["| " + " | ".join(columns) + " |",
         "|" + "|".join("---:" if right(c) else "---" for c in columns) +
         "|"]
  out += ["| " + " | ".join(r[i] for i in idx) + " |" for r in rows]
  source = "; ".join(f"{k}: {facts[k]}" for k in PROVENANCE if k in facts)
  if source:
    out += ["", f"<sub>Generated from results.md ({source}).</sub>"]
  return "\n".join(out)


def rewrite(readme: str, block: str) -> str:
  """README text with the marked block replaced."""
  if readme.count(BEGIN) != 1 or readme.count(END) != 1:
    raise ValueError(f"the README must hold exactly one {BEGIN!r} and one "
                     f"{END!r} line around the results table")
  head, rest = readme.split(BEGIN)
  _, tail = rest.split(END)
  return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("results", help="a run's results.md")
  p.add_argument("--readme", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      "README.md"))
  p.add_argument("--columns", default=",".join(COLUMNS),
                 help="comma-separated results.md column names")
  a = p.parse_args(argv)
  with open(a.results) as f:
    block = table(f.read(), tuple(a.columns.split(",")))
  with open(a.readme) as f:
    text = rewrite(f.read(), block)
  with open(a.readme, "w") as f:
    f.write(text)
  print(f"rewrote the results table of {a.readme} from {a.results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
