"""Markdown tables of a benchmark results JSON (bench/results/bench_*.json), for bench/README.md.

    python tools/bench_tables.py [bench/results/bench_<device>_<time>.json]     # default: the newest

Ratios are ours / baseline: medians, with the ratio of the fastest rounds in brackets (CPU runs); below 1
means ours is faster.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ratio(baseline: dict) -> str:
    text = f"{baseline['ratio']:.2f}"
    if baseline.get("ratio_of_minima") is not None:
        text += f" ({baseline['ratio_of_minima']:.2f})"
    return text


def _target_flags(case: dict) -> str:
    return ", ".join(f"{'met' if t['met'] else 'missed'}" if t.get("met") is not None else "n/a"
                     for t in case.get("targets", [])) or "-"


def _with_floor_column(cases, rows: list, provider: str) -> list:
    """Adds a column measured / roofline estimate of `provider` when the run stored floors (GPU runs store
    `roofline` with each case; bench/roofline.py). rows: header, separator, then one row per case."""
    if not any("roofline" in case for case in cases):
        return rows
    rows[0] += " ours / roofline |"
    rows[1] += "---|"
    for index, case in enumerate(cases, start=2):
        floor = case.get("roofline", {}).get("providers", {}).get(provider, {})
        value = floor.get("measured_over_estimate")
        rows[index] += f" {value:.2f} ({floor['bound']}) |" if value is not None else " - |"
    return rows


def linear_table(cases) -> list:
    rows = ["| layer | r | dtype | mode | path | ours ms | / frozen | / unfused | / merged | / peft | targets |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        p, b = case["params"], case["baselines"]
        shape = p["shape"]
        layer = f"{shape['name']} {shape['batch']}x{shape['tokens']}, {shape['d_in']}->{shape['d_out']}"
        cells = [_ratio(b[k]) if k in b else "-" for k in ("frozen", "unfused", "merged", "peft")]
        path = case["path"] if isinstance(case["path"], str) else json.dumps(case["path"])
        rows.append(f"| {layer} | {p['rank']} | {p['dtype']} | {p['mode']} | {path.split(' ')[0]} | "
                    f"{case['time_ms']:.2f} | " + " | ".join(cells) + f" | {_target_flags(case)} |")
    return _with_floor_column(cases, rows, "ours")


def fisher_table(cases) -> list:
    rows = ["| layer | r | with / without Fisher | increment ms | vmap Fisher / increment | bmm Fisher ms | "
            "targets (1.10x, 20x) | max rel. diff to ours |", "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        p, m, b = case["params"], case["metrics"], case["baselines"]
        shape = p["shape"]
        diff = max(m.get("relative_difference_to_ours", {}).values(), default=float("nan"))
        rows.append(f"| {shape['name']} {shape['batch']}x{shape['tokens']} | {p['rank']} | "
                    f"{m['with_over_without']:.2f} | {m['fisher_increment_ms']:.2f} | "
                    f"{m['vmap_over_increment']:.1f} | {b['bmm_fisher']['min_ms']:.2f} | {_target_flags(case)} | "
                    f"{diff:.0e} |")
    return _with_floor_column(cases, rows, "ours_fisher")


def growth_table(cases) -> list:
    rows = ["| growth case | ours ms | ours / baseline, median (fastest) |", "|---|---|---|"]
    for case in cases:
        p = case["params"]
        if p.get("mode") == "compile_counts":
            m = case["metrics"]
            rows.append(f"| compile counts across growths ({p.get('backend')}) | - | new torch.compile graphs "
                        f"{m['new_backend_graphs']}, new Triton compilations {m['new_triton_compilations']}, "
                        f"output mismatches {len(m['output_mismatches'])} |")
            continue
        baselines = ", ".join(f"{k} {v['time_ms']:.1f} ms: {_ratio(v)}" for k, v in case["baselines"].items())
        rows.append(f"| {p['mode']} ({p['modules']} modules) | {case['time_ms']:.1f} | {baselines} |")
    return rows


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    meta = data["metadata"]
    by_op = {}
    for case in data["cases"]:
        by_op.setdefault(case["op"], []).append(case)
    out = [f"Results file: `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` "
           f"(device {meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, peft {meta['peft']}, "
           f"commit {meta['git_commit'][:10]}, extension {meta['extension']}, load average at start "
           f"{meta['load_average_at_start'][0]:.1f}).", ""]
    for title, op, table in (("SeLoRALinear", "selora_linear", linear_table), ("Per-sample Fisher", "fisher",
                                                                                 fisher_table),
                             ("Growth", "growth", growth_table)):
        if op in by_op:
            out += [f"#### {title}", ""] + table(by_op[op]) + [""]
    summary = data["targets_summary"]
    out.append(f"Targets in this run: {summary['met']} met, {summary['missed']} missed, "
               f"{summary['not_measured']} not measured.")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else max((ROOT / "bench" / "results").glob("bench_*.json"),
                                           key=lambda p: p.stat().st_mtime)
    print(render(path.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
