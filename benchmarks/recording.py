"""Record benchmark results: one JSON line on stdout and one dated row in ``benchmarks/RESULTS.md``.

Every benchmark in this folder measures ours against a reference formulation in the same run and
calls :func:`record_result` once at the end, so that ``RESULTS.md`` is an append-only log of
side-by-side ratios with the machine and library versions they were measured on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
_TABLE_HEADER = (
    "| date (UTC) | benchmark | machine | versions | command | metrics | notes |\n"
    "| --- | --- | --- | --- | --- | --- | --- |\n"
)


def describe_machine() -> str:
    """Short description of the host: CPU model, core count and accelerator if any."""
    import torch

    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    description = f"{cpu_name}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        description += f", {torch.cuda.get_device_name(0)}"
    return description


def describe_versions() -> str:
    """Versions of the libraries whose speed the benchmarks depend on."""
    versions = []
    for package in ("torch", "torchvision", "transformers", "accelerate", "datasets"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def record_result(
    benchmark: str,
    command: str,
    metrics: dict,
    notes: str = "",
    results_path: Path | None = None,
) -> None:
    """Print ``metrics`` as one JSON line and append a dated row to the results table.

    Args:
        benchmark: short name, e.g. ``"bench_loss"``.
        command: the exact command line that reproduces the measurement.
        metrics: flat mapping of names to numbers/strings (medians, ratio to the reference...).
        notes: free text, e.g. what the reference formulation is.
        results_path: table to append to (defaults to ``benchmarks/RESULTS.md``; tests pass a
            temporary file).
    """
    results_path = results_path or RESULTS_PATH
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    record = {
        "benchmark": benchmark,
        "date": date,
        "machine": describe_machine(),
        "versions": describe_versions(),
        "command": command,
        **metrics,
    }
    print(json.dumps(record), flush=True)

    if not results_path.exists():
        results_path.write_text(
            "# Benchmark results\n\nAppended by the scripts in `benchmarks/` "
            "(see `make bench`). Each row is one run; ratios compare ours with the reference "
            "formulation measured in the same run.\n\n" + _TABLE_HEADER,
            encoding="utf-8",
        )
    metric_text = "<br>".join(f"{name}={_format_value(value)}" for name, value in metrics.items())
    row = [date, benchmark, record["machine"], record["versions"], f"`{command}`", metric_text, notes]
    cells = [str(cell).replace("|", "\\|").replace("\n", " ") for cell in row]
    with results_path.open("a", encoding="utf-8") as table:
        table.write("| " + " | ".join(cells) + " |\n")


def write_metrics_json(metrics: dict, path: Path | None) -> None:
    """Also write ``metrics`` as an indented JSON file at ``path`` (nothing when ``None``)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
