"""The README's benchmark figures are written by hand; they must be those bench/results.json holds.

bench/RESULTS.md is generated from results.json (bench/report.py); the README's table and presets
table quote the latest figures from it, and drifted from it once (they quoted an older machine's
records as the latest). This reads the README as a user does and compares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _results() -> dict:
    return json.loads((ROOT / "bench" / "results.json").read_text())


def _benchmark_rows() -> dict[str, list[str]]:
    """The Benchmarks section's table: first cell (the figure) -> the row's cells."""
    section = (ROOT / "README.md").read_text().split("\n## Benchmarks\n")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def _first_number(text: str) -> str:
    return re.search(r"\d+(?:\.\d+)?", text).group(0)


def test_the_readme_benchmark_table_quotes_the_latest_results():
    results, rows = _results(), _benchmark_rows()
    measured = {figure: cells[2] for figure, cells in rows.items()}
    assert _first_number(measured["`asha` compute_ratio"]) == f"{results['asha']['compute_ratio']:.2f}"
    assert f"accuracy_gap {results['asha']['accuracy_gap']:+.3f}" in measured["`asha` compute_ratio"]
    assert _first_number(measured["`halving` compute_ratio"]) == f"{results['halving']['compute_ratio']:.2f}"
    assert _first_number(measured["`train_overhead` ratio"]) == f"{results['train_overhead']['ratio']:.2f}"
    assert _first_number(measured["`ingest` ratio"]) == f"{results['ingest']['ratio']:.2f}"
    assert _first_number(measured["`serve` batching_gain_c32"]) == f"{results['serve']['batching_gain_c32']:.2f}"

    end_to_end = results["end_to_end"]
    assert measured["`end_to_end` total_s"].startswith(f"{end_to_end['total_s']:.0f} s ")
    assert rows["`end_to_end` total_s"][1].endswith(
        f"Ray start {end_to_end['ray_start_s']:g} s, search {end_to_end['search_s']:g} s, "
        f"evaluation {end_to_end['evaluation_s']:g} s, deploy {end_to_end['deploy_s']:g} s")

    def peaks(run: dict) -> str:
        return (f"{run['driver_peak_rss_mib']:.0f} / {run['worker_peak_rss_mib']:.0f} "
                f"({run['worker_peak_uss_mib']:.0f}) MiB")

    memory = results["memory"]
    assert measured["`memory` peak RSS"].startswith(
        f"digits {peaks(memory['digits'])}; rotten tomatoes {peaks(memory['rotten_tomatoes'])}")


def test_the_readme_presets_table_quotes_the_latest_end_to_end_run():
    end_to_end = _results()["end_to_end"]
    (row,) = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `resnet18_digits` |")]
    assert (f"test accuracy {end_to_end['test_accuracy']} in {end_to_end['total_s']:.0f} s "
            "(`end_to_end` in bench/RESULTS.md)") in row
