"""Render the latest benchmark records into README.md between the performance markers, so the
figures shown are the figures measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
HIDDEN = {"seconds", "n_genes", "genes_per_cell_drawn"}


IDENTITY = (
    "stage",
    "workers",
    "n_cells",
    "method",
    "preset",
    "head",
    "precision",
    "device",
    "attention",
    "cpu_bf16",
)
# what a record written before the key existed measured (every CPU record before `cpu_bf16`: AVX-512 BF16)
DEFAULTS = {"precision": "float32", "device": "cpu", "cpu_bf16": "avx512"}


def _key(rec: dict) -> str:
    """What a figure is a figure of: a newer record with the same identity replaces an older one."""
    cfg = rec["config"]
    return json.dumps([rec["metric"], *(cfg.get(k, DEFAULTS.get(k)) for k in IDENTITY)])


def latest(path: Path) -> list[dict]:
    """The last record of every (metric, config) in the file, in first-seen order."""
    last: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            last.pop(_key(rec), None)
            last[_key(rec)] = rec
    return list(last.values())


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table() -> str:
    rows = [
        "| benchmark | metric | value | unit | configuration | machine, commit, date |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.jsonl")):
        for r in latest(path):
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in HIDDEN)
            rows.append(
                f"| {r['benchmark']} | {r['metric']} | {_fmt(r['value'])} | {r['unit']} | "
                f"{cfg} | {r['machine']}, {r['git']}, {r['date']} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    args = p.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
    print(f"performance table in {readme} updated from {RESULTS}")


if __name__ == "__main__":
    main()
