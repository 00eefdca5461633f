"""Markdown tables from a pytest-benchmark JSON file:
    pytest benchmarks/test_rope2d.py --benchmark-only --benchmark-json=out.json
    python -m benchmarks.table out.json [--baseline memory-floor]
One table per group (one shape): each row's median and its ratio to the baseline row, all
measured side by side in the same run."""
import argparse
import json
import re
from collections import OrderedDict


def row_name(bench: dict) -> str:
    # test_op[ROW-shape...]: the first parametrize id is the row
    params = bench.get("params") or {}
    if "row" in params:
        return str(params["row"])
    m = re.search(r"\[(.*)\]", bench["name"])
    return m.group(1).split("-")[0] if m else bench["name"]


def tables(data: dict, baseline: str) -> str:
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append((row_name(b), b["stats"]["median"]))
    out = [f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
           f"{data['machine_info'].get('cpu', {}).get('count', '?')} logical CPUs; "
           f"torch threads as configured in the run.\n"]
    for group, rows in groups.items():
        base = dict(rows).get(baseline)
        out.append(f"**{group}**\n\n| row | median (ms) | vs {baseline} |\n|---|---:|---:|")
        for name, median in sorted(rows, key=lambda r: r[1]):
            ratio = f"{median / base:.2f}x" if base else "-"
            out.append(f"| {name} | {median * 1e3:.3f} | {ratio} |")
        out.append("")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--baseline", default="memory-floor")
    args = parser.parse_args()
    with open(args.json) as f:
        print(tables(json.load(f), args.baseline))


if __name__ == "__main__":
    main()
