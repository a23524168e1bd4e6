"""Record benchmark results: one JSON line on stdout and one dated row in ``benchmarks/RESULTS.md``.

Every benchmark in this folder measures ours against a reference formulation in the same run and
calls :func:`record_result` once at the end, so that ``RESULTS.md`` is an append-only log of
side-by-side ratios with the machine and library versions they were measured on.

Rows are kept apart by machine: each machine (CPU model, usable cores, SIMD level, native bf16 or
not, GPU) has its own section (``## Machine: ...``) and table, created on its first row, so that a
figure measured on one CPU is never read as a promise for another.
"""

from __future__ import annotations

import datetime
import json
import sys
from importlib import metadata
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
SECTION_PREFIX = "## Machine: "
_TABLE_HEADER = (
    "| date (UTC) | benchmark | versions | command | metrics | notes |\n"
    "| --- | --- | --- | --- | --- | --- |\n"
)


def describe_machine() -> str:
    """The host as a section title: CPU model, usable cores, SIMD level, native bf16, and the GPU if any."""
    import torch

    from dino_hf.train.hardware import describe_cpu

    description = describe_cpu().describe()
    if torch.cuda.is_available():
        description += f"; GPU {torch.cuda.get_device_name(0)}"
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


def _insert_row(text: str, machine: str, row: str) -> str:
    """``text`` with ``row`` appended to ``machine``'s table (the section is created when missing)."""
    heading = f"{SECTION_PREFIX}{machine}\n"
    start = text.find(heading)
    if start < 0:
        return text.rstrip("\n") + f"\n\n{heading}\n" + _TABLE_HEADER + row
    next_section = text.find("\n## ", start + len(heading))
    end = len(text) if next_section < 0 else next_section + 1
    section = text[start:end].rstrip("\n") + "\n" + row
    return text[:start] + section + ("\n" + text[end:] if next_section >= 0 else "")


def record_result(
    benchmark: str,
    command: str,
    metrics: dict,
    notes: str = "",
    results_path: Path | None = None,
) -> None:
    """Print ``metrics`` as one JSON line and append a dated row to this machine's results table.

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
    machine = describe_machine()
    record = {
        "benchmark": benchmark,
        "date": date,
        "machine": machine,
        "versions": describe_versions(),
        "command": command,
        **metrics,
    }
    print(json.dumps(record), flush=True)

    if results_path.exists():
        text = results_path.read_text(encoding="utf-8")
    else:
        text = (
            "# Benchmark results\n\nAppended by the scripts in `benchmarks/` (see `make bench`). Each row is one "
            "run; ratios compare ours with the reference formulation measured in the same run. Rows are kept "
            "apart by machine.\n"
        )
    metric_text = "<br>".join(f"{name}={_format_value(value)}" for name, value in metrics.items())
    cells = [date, benchmark, record["versions"], f"`{command}`", metric_text, notes]
    row = "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |\n"
    results_path.write_text(_insert_row(text, machine, row), encoding="utf-8")


def publish(benchmark: str, script: str, argv: list[str] | None, metrics: dict, notes: str, record: bool) -> None:
    """End of a benchmark: :func:`record_result` (``record``), else print the metrics and notes as one JSON line.

    ``script`` is the benchmark's path from the repository root; ``argv`` its arguments (default
    ``sys.argv[1:]``), which make the row's command.
    """
    arguments = argv if argv is not None else sys.argv[1:]
    command = f"python {script} {' '.join(arguments)}".strip()
    if record:
        record_result(benchmark, command, metrics, notes)
    else:
        print(json.dumps({"benchmark": benchmark, **metrics, "notes": notes}))


def write_metrics_json(metrics: dict, path: Path | None) -> None:
    """Also write ``metrics`` as an indented JSON file at ``path`` (nothing when ``None``)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
