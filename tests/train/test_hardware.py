"""dino_hf.train.hardware: the machine's facts and the decisions taken from them (precision, workers, threads).

The decisions are pure functions of the facts, so both answers of the bf16 probe are tested without
timing anything; the probe itself is only checked to return a positive ratio.
"""

from __future__ import annotations

import pytest

from dino_hf.train.hardware import (
    BF16_MIN_SPEEDUP,
    choose_mixed_precision,
    choose_num_threads,
    choose_num_workers,
    describe_cpu,
    measure_cpu_bf16_speedup,
)


def probe_answering(speedup: float):
    calls = []

    def probe() -> float:
        calls.append(speedup)
        return speedup

    return probe, calls


def test_auto_on_a_cpu_without_fast_bf16_is_fp32():
    probe, calls = probe_answering(0.2)  # bf16 5x slower, as on a CPU without bf16 instructions
    choice = choose_mixed_precision("auto", "cpu", cpu_bf16_speedup=probe)
    assert choice.mixed_precision == "no" and calls == [0.2]
    assert "5.0x slower" in choice.reason and choice.warning is None
    # about as fast is not enough: the exact fp32 path stays
    probe, _ = probe_answering(BF16_MIN_SPEEDUP - 0.01)
    assert choose_mixed_precision("auto", "cpu", cpu_bf16_speedup=probe).mixed_precision == "no"


def test_auto_on_a_cpu_where_the_probe_finds_bf16_faster_is_bf16():
    probe, _ = probe_answering(3.0)
    choice = choose_mixed_precision("auto", "cpu", cpu_bf16_speedup=probe)
    assert choice.mixed_precision == "bf16" and "3.0x faster" in choice.reason
    assert choice.cpu_bf16_speedup == 3.0


def test_auto_on_cuda_uses_bf16_where_supported_else_fp16_and_never_probes():
    probe, calls = probe_answering(0.1)
    assert choose_mixed_precision("auto", "cuda", True, probe).mixed_precision == "bf16"
    assert choose_mixed_precision("auto", "cuda", False, probe).mixed_precision == "fp16"
    assert choose_mixed_precision("auto", "mps", False, probe).mixed_precision == "no"
    assert calls == []


def test_explicit_choices_are_obeyed_and_slow_bf16_warns_with_the_factor():
    probe, _ = probe_answering(0.25)
    choice = choose_mixed_precision("bf16", "cpu", cpu_bf16_speedup=probe)
    assert choice.mixed_precision == "bf16"
    assert "4.0x slower" in choice.warning and "--mixed_precision auto" in choice.warning
    fast, _ = probe_answering(2.0)
    assert choose_mixed_precision("bf16", "cpu", cpu_bf16_speedup=fast).warning is None
    untouched, calls = probe_answering(0.25)
    assert choose_mixed_precision("no", "cpu", cpu_bf16_speedup=untouched).mixed_precision == "no"
    assert choose_mixed_precision("fp16", "cuda", cpu_bf16_speedup=untouched).mixed_precision == "fp16"
    assert calls == []


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("shards", [None, 1, 2, 8, 100])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_workers_never_exceed_cores_or_shards(cores, shards, device_type):
    workers = choose_num_workers(None, cores, shards, device_type)
    assert 0 <= workers < max(cores, 2)
    assert workers <= cores - 1 or workers == 0
    if shards is not None:
        assert workers <= shards
    threads = choose_num_threads(cores, workers, device_type)
    assert threads >= 1
    if device_type == "cpu" and cores > 1:
        assert workers + threads == cores  # compute and loading share the cores without oversubscribing


def test_worker_choices_on_typical_machines():
    assert choose_num_workers(None, 2, 8, "cpu") == 1  # the 2-core demo machine: one augments, one computes
    assert choose_num_threads(2, 1, "cpu") == 1
    assert choose_num_workers(None, 2, 1, "cpu") == 1  # a one-shard image folder: never more than 1
    assert choose_num_workers(None, 1, 8, "cpu") == 0  # a single core: load in the training process
    assert choose_num_workers(None, 12, 64, "cuda") == 11  # a GPU process: every other core augments
    assert choose_num_workers(None, 12, 4, "cuda") == 4
    assert choose_num_workers(3, 2, 1, "cpu") == 3  # explicit counts are obeyed


def test_describe_cpu_reads_native_bf16_from_the_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nmodel name : Some Xeon\nflags : fpu avx2 avx512f amx_bf16\n")
    info = describe_cpu(str(cpuinfo))
    assert info.model == "Some Xeon" and info.native_bf16 and info.cores >= 1
    cpuinfo.write_text("processor : 0\nmodel name : Some EPYC\nflags : fpu avx2\n")
    info = describe_cpu(str(cpuinfo))
    assert not info.native_bf16 and "no native bf16" in info.describe()


def test_the_probe_returns_a_positive_ratio_quickly():
    assert measure_cpu_bf16_speedup(max_seconds=0.05, size=64) > 0
