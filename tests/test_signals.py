"""Tests of the Triton metrics parser (gateway.core.signals): real pages, tables, properties."""
# ruff: noqa: E501  (the captured page keeps Triton's own long HELP lines)

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.signals import ModelCounters, RawMetrics, derive_signals, parse_metrics
from gateway.core.types import GpuSignal, ModelSignal

# Captured from a real Triton 2.51 (nvidia-pytriton 0.7.0, CPU only) after 5 inferences of
# batch 2 on model "simple": no nv_gpu_* series and no gpu_uuid labels.
REAL_TRITON_CPU_PAGE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="simple",version="1"} 5
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="simple",reason="OTHER",version="1"} 0
nv_inference_request_failure{model="simple",reason="BACKEND",version="1"} 0
nv_inference_request_failure{model="simple",reason="CANCELED",version="1"} 0
nv_inference_request_failure{model="simple",reason="REJECTED",version="1"} 0
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="simple",version="1"} 10
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="simple",version="1"} 5
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds (includes cached requests)
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="simple",version="1"} 22781
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="simple",version="1"} 190
# HELP nv_inference_compute_input_duration_us Cumulative compute input duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{model="simple",version="1"} 171
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="simple",version="1"} 22190
# HELP nv_inference_compute_output_duration_us Cumulative inference compute output duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{model="simple",version="1"} 214
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="simple",version="1"} 0
# HELP nv_pinned_memory_pool_total_bytes Pinned memory pool total memory size, in bytes
# TYPE nv_pinned_memory_pool_total_bytes gauge
nv_pinned_memory_pool_total_bytes 268435456
# HELP nv_pinned_memory_pool_used_bytes Pinned memory pool used memory size, in bytes
# TYPE nv_pinned_memory_pool_used_bytes gauge
nv_pinned_memory_pool_used_bytes 0
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.005
# HELP nv_cpu_memory_total_bytes CPU total memory (RAM), in bytes
# TYPE nv_cpu_memory_total_bytes gauge
nv_cpu_memory_total_bytes 25276059648
# HELP nv_cpu_memory_used_bytes CPU used memory (RAM), in bytes
# TYPE nv_cpu_memory_used_bytes gauge
nv_cpu_memory_used_bytes 540008448
"""

GPU_A = "GPU-4c1b7f3e-9a1d-2e7b-6f0c-1d2e3f4a5b6c"
GPU_B = "GPU-8d2e9f4a-0b1c-3d4e-5f6a-7b8c9d0e1f2a"

# The shape of a GPU Triton's page (Triton docs, metrics.md): per-model series carry a
# gpu_uuid label per model instance's GPU, label names sorted, quoted label values.
GPU_PAGE = f"""\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{gpu_uuid="{GPU_A}",model="resnet",version="1"}} 100
nv_inference_request_success{{gpu_uuid="{GPU_B}",model="resnet",version="1"}} 50
nv_inference_request_success{{gpu_uuid="{GPU_A}",model="resnet",version="2"}} 10
nv_inference_request_success{{gpu_uuid="{GPU_A}",model="bert",version="1"}} 7
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{{gpu_uuid="{GPU_A}",model="resnet",reason="OTHER",version="1"}} 1
nv_inference_request_failure{{gpu_uuid="{GPU_A}",model="resnet",reason="BACKEND",version="1"}} 2
nv_inference_request_failure{{gpu_uuid="{GPU_A}",model="resnet",reason="CANCELED",version="1"}} 0
nv_inference_request_failure{{gpu_uuid="{GPU_B}",model="resnet",reason="REJECTED",version="1"}} 3
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{{gpu_uuid="{GPU_A}",model="resnet",version="1"}} 800
nv_inference_count{{gpu_uuid="{GPU_B}",model="resnet",version="1"}} 400
nv_inference_count{{gpu_uuid="{GPU_A}",model="resnet",version="2"}} 10
# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{{gpu_uuid="{GPU_A}",model="resnet",version="1"}} 100
nv_inference_exec_count{{gpu_uuid="{GPU_B}",model="resnet",version="1"}} 50
nv_inference_exec_count{{gpu_uuid="{GPU_A}",model="resnet",version="2"}} 10
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{{gpu_uuid="{GPU_A}",model="resnet",version="1"}} 1000000
nv_inference_request_duration_us{{gpu_uuid="{GPU_B}",model="resnet",version="1"}} 600000
nv_inference_request_duration_us{{gpu_uuid="{GPU_A}",model="resnet",version="2"}} 50000
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{gpu_uuid="{GPU_A}",model="resnet",version="1"}} 200000
nv_inference_queue_duration_us{{gpu_uuid="{GPU_B}",model="resnet",version="1"}} 120000
nv_inference_queue_duration_us{{gpu_uuid="{GPU_A}",model="resnet",version="2"}} 10000
# HELP nv_inference_pending_request_count Instantaneous number of pending requests.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{{model="resnet",version="1"}} 4
nv_inference_pending_request_count{{model="resnet",version="2"}} 1
nv_inference_pending_request_count{{model="bert",version="1"}} 0
# HELP nv_inference_request_summary_us Summary of inference request duration in microseconds
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{{model="resnet",version="1"}} 150
nv_inference_request_summary_us{{model="resnet",version="1",quantile="0.5"}} 9000
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{{gpu_uuid="{GPU_A}"}} 0.75
nv_gpu_utilization{{gpu_uuid="{GPU_B}"}} 0.25
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{{gpu_uuid="{GPU_A}"}} 85899345920
nv_gpu_memory_total_bytes{{gpu_uuid="{GPU_B}"}} 42949672960
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="{GPU_A}"}} 21474836480
nv_gpu_memory_used_bytes{{gpu_uuid="{GPU_B}"}} 4.294967296e+10
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{{gpu_uuid="{GPU_A}"}} 312.5
# HELP nv_energy_consumption GPU energy consumption in joules since the Triton Server started
# TYPE nv_energy_consumption counter
nv_energy_consumption{{gpu_uuid="{GPU_A}"}} 123456.789
nv_cpu_utilization 0.12
"""


def test_real_cpu_only_page() -> None:
    raw = parse_metrics(REAL_TRITON_CPU_PAGE)
    assert raw.gpus == ()
    assert raw.samples_skipped == 0
    assert raw.models == {"simple": ModelCounters(
        pending=0, success=5, failure=0, inference_count=10, exec_count=5,
        request_duration_us=22781, queue_duration_us=190, compute_infer_us=22190)}
    signals = derive_signals(None, raw, scraped_at=100.0, prev_at=None)
    assert not signals.has_gpu
    assert signals.free_memory_bytes == 0.0
    # first scrape: no interval, so no rates, and lifetime means for the times
    simple = signals.models["simple"]
    assert (simple.pending, simple.success_per_s, simple.failure_per_s) == (0, 0, 0)
    assert simple.queue_time_s == pytest.approx(190 / 5 / 1e6)
    assert simple.request_time_s == pytest.approx(22781 / 5 / 1e6)


def test_gpu_page_sums_over_versions_gpus_and_reasons() -> None:
    raw = parse_metrics(GPU_PAGE)
    assert raw.samples_skipped == 0
    assert raw.gpus == (
        GpuSignal(GPU_A, 85899345920, 21474836480, 0.75),
        GpuSignal(GPU_B, 42949672960, 42949672960, 0.25),
    )
    resnet = raw.models["resnet"]
    assert resnet == ModelCounters(pending=5, success=160, failure=6, inference_count=1210,
                                   exec_count=160, request_duration_us=1650000,
                                   queue_duration_us=330000)
    assert raw.models["bert"] == ModelCounters(success=7)
    signals = derive_signals(None, raw, 1.0, None)
    assert signals.free_memory_bytes == 85899345920 - 21474836480
    assert signals.gpu_utilisation == pytest.approx(0.5)
    assert signals.pending() == 5
    assert signals.pending("resnet") == 5


def _page(success: float, failure: float, queue_us: float, request_us: float,
          pending: float = 0) -> RawMetrics:
    lines = [
        f'nv_inference_request_success{{model="m",version="1"}} {success}',
        f'nv_inference_request_failure{{model="m",reason="OTHER",version="1"}} {failure}',
        f'nv_inference_queue_duration_us{{model="m",version="1"}} {queue_us}',
        f'nv_inference_request_duration_us{{model="m",version="1"}} {request_us}',
        f'nv_inference_pending_request_count{{model="m",version="1"}} {pending}',
    ]
    return parse_metrics("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("prev", "cur", "prev_at", "now", "expected"),
    [
        pytest.param(  # steady interval of 2 s: 20 successes, 4 failures
            _page(100, 1, 50_000, 500_000), _page(120, 5, 90_000, 700_000, pending=3),
            10.0, 12.0,
            ModelSignal(pending=3, queue_time_s=0.002, request_time_s=0.01,
                        success_per_s=10.0, failure_per_s=2.0),
            id="interval"),
        pytest.param(  # counters went down: the worker restarted, count from zero
            _page(1000, 10, 900_000, 9_000_000), _page(10, 0, 20_000, 100_000),
            0.0, 1.0,
            ModelSignal(queue_time_s=0.002, request_time_s=0.01, success_per_s=10.0),
            id="counter-reset"),
        pytest.param(  # nothing succeeded in the interval: no new latency information
            _page(100, 1, 50_000, 500_000), _page(100, 3, 50_000, 500_000, pending=7),
            0.0, 1.0,
            ModelSignal(pending=7, failure_per_s=2.0),
            id="no-successes"),
        pytest.param(  # clock did not advance: treated as a first scrape
            _page(100, 1, 50_000, 500_000), _page(120, 1, 90_000, 700_000),
            5.0, 5.0,
            ModelSignal(queue_time_s=0.00075, request_time_s=700_000 / 120 / 1e6),
            id="no-interval"),
        pytest.param(
            None, _page(0, 0, 0, 0, pending=2), None, 1.0, ModelSignal(pending=2),
            id="first-scrape-idle"),
    ],
)
def test_derive_signals(prev: RawMetrics | None, cur: RawMetrics, prev_at: float | None,
                        now: float, expected: ModelSignal) -> None:
    signals = derive_signals(prev, cur, scraped_at=now, prev_at=prev_at)
    assert signals.scraped_at == now
    got = signals.models["m"]
    for name in ModelSignal.__slots__:
        assert getattr(got, name) == pytest.approx(getattr(expected, name)), name


def test_model_new_in_second_scrape_has_no_rates() -> None:
    prev = parse_metrics('nv_inference_request_success{model="a",version="1"} 5\n')
    cur = parse_metrics('nv_inference_request_success{model="a",version="1"} 9\n'
                        'nv_inference_request_success{model="b",version="1"} 4\n')
    signals = derive_signals(prev, cur, 2.0, 1.0)
    assert signals.models["a"].success_per_s == 4.0
    assert signals.models["b"].success_per_s == 0.0


@pytest.mark.parametrize(
    ("line", "model"),
    [
        ('nv_inference_request_success{model="a\\"b",version="1"} 1', 'a"b'),
        ('nv_inference_request_success{model="a\\\\b",version="1"} 1', "a\\b"),
        ('nv_inference_request_success{model="a\\nb",version="1"} 1', "a\nb"),
        ('nv_inference_request_success{model="x}y,z=\\"w",version="1"} 1', 'x}y,z="w'),
        ('nv_inference_request_success{ model = "spaced" , version="1" , } 1', "spaced"),
        ('nv_inference_request_success{model="ts",version="1"} 1 1700000000000', "ts"),
        ('nv_inference_request_success{model="crlf",version="1"} 1\r', "crlf"),
        ('nv_inference_request_success{model="exp",version="1"} 1e0', "exp"),
        ('nv_inference_request_success{x="q,model=",model="real",version="1"} 1', "real"),
        ('nv_inference_request_success{mymodel="no",model="yes",version="1"} 1', "yes"),
        ('nv_inference_request_success{model="",version="1"} 1', ""),
    ],
)
def test_label_and_value_forms(line: str, model: str) -> None:
    raw = parse_metrics(line + "\n")
    assert raw.samples_skipped == 0
    assert raw.models == {model: ModelCounters(success=1)}


@pytest.mark.parametrize(
    "line",
    [
        'nv_inference_request_success{model="a",version="1"}',          # no value
        'nv_inference_request_success{model="a",version="1"} abc',      # not a number
        'nv_inference_request_success{model="a,version="1"} 1',         # unbalanced quote
        'nv_inference_request_success{model="a",version="1" 1',         # no closing brace
        'nv_inference_request_success{model=a} 1',                      # unquoted value
        'nv_inference_request_success{version="1"} 1',                  # no model label
        'nv_gpu_utilization 0.5',                                        # no gpu_uuid label
        'nv_inference_request_success{model="a"} 1 2 3',                # trailing junk
        '{model="a"} 1',                                                 # no name
    ],
)
def test_malformed_lines_are_skipped(line: str) -> None:
    good = 'nv_inference_request_success{model="ok",version="1"} 3'
    raw = parse_metrics(f"{good}\n{line}\n{good}\n")
    assert raw.models == {"ok": ModelCounters(success=6)}
    assert raw.samples_skipped == 1


def test_non_finite_values_are_ignored() -> None:
    raw = parse_metrics('nv_inference_request_success{model="a",version="1"} NaN\n'
                        'nv_inference_request_success{model="a",version="2"} +Inf\n'
                        'nv_inference_request_success{model="a",version="3"} 2\n')
    assert raw.models["a"].success == 2


def test_utilisation_is_clamped_and_gpu_without_memory_series() -> None:
    raw = parse_metrics('nv_gpu_utilization{gpu_uuid="GPU-1"} 1.5\n')
    assert raw.gpus == (GpuSignal("GPU-1", 0.0, 0.0, 1.0),)


def test_empty_page() -> None:
    assert parse_metrics("") == RawMetrics()
    assert derive_signals(None, RawMetrics(), 1.0, None).models == {}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('nv_gpu{}="\\,. \n\t#0123456789e+-abmodelINF')),
               max_size=300))
def test_parser_never_raises(text: str) -> None:
    raw = parse_metrics(text)
    for counters in raw.models.values():
        assert all(math.isfinite(getattr(counters, f)) for f in ModelCounters.__slots__)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12), st.integers(0, 10**12)),
                min_size=1, max_size=8))
def test_escaped_model_names_round_trip(rows: list[tuple[str, int]]) -> None:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    page = "".join(f'nv_inference_count{{model="{escape(name)}",version="1"}} {n}\n'
                   for name, n in rows)
    expected: dict[str, float] = {}
    for name, n in rows:
        expected[name] = expected.get(name, 0.0) + n
    raw = parse_metrics(page)
    assert {k: v.inference_count for k, v in raw.models.items()} == expected


_VALUE_CHARS = st.text(alphabet=st.sampled_from(list('ab,}={ =model_')), max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_VALUE_CHARS, _VALUE_CHARS, st.booleans(), st.integers(0, 999)),
                min_size=1, max_size=6))
def test_fast_path_reads_tricky_unescaped_values(
        rows: list[tuple[str, str, bool, int]]) -> None:
    # decoy labels whose values look like label syntax, before or after the real one
    lines = []
    expected: dict[str, float] = {}
    for model, decoy, decoy_first, n in rows:
        labels = [f'model="{model}"', f'mymodel="{decoy}"', f'x="{decoy}"']
        if decoy_first:
            labels.reverse()
        lines.append(f'nv_inference_exec_count{{{",".join(labels)}}} {n}\n')
        expected[model] = expected.get(model, 0.0) + n
    raw = parse_metrics("".join(lines))
    assert raw.samples_skipped == 0
    assert {k: v.exec_count for k, v in raw.models.items()} == expected
