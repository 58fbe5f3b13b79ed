"""The largest-batch search of bench/unet_step.py (`--find-max-batch`), against a closed
form: a fake step that fits exactly up to a known batch."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from _common import LinearMemory, is_oom, largest_fitting  # noqa: E402


@pytest.mark.parametrize("true_max,granularity,expected", [(37, 1, 37), (37, 8, 32), (200, 8, 200), (5, 8, None)])
def test_doubling_then_bisection_finds_the_largest_fitting_batch(true_max, granularity, expected):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= true_max

    r = largest_fitting(fits, 8, 1024, granularity, budget_s=60, log=lambda *_: None)
    assert r["max_batch"] == expected and r["exact"]
    assert all(b % granularity == 0 for b in probes) and len(set(probes)) == len(probes)
    assert len(probes) <= 12


def test_a_memory_model_finds_it_in_fewer_probes():
    """Peak bytes linear in the batch (1 GB + 0.3 GB per image, 80 GB): the prediction
    lands next to the answer (263 images) after two probes."""
    mem, probes = LinearMemory(80e9), []

    def fits(b):
        probes.append(b)
        mem.add(b, 1e9 + 0.3e9 * b)
        return 1e9 + 0.3e9 * b <= 80e9

    r = largest_fitting(fits, 8, 1024, 1, budget_s=60, predict=mem.predict, log=lambda *_: None)
    assert r["max_batch"] == 263 and r["exact"]
    assert len(probes) <= 4, probes


def test_the_limit_and_the_time_budget_end_the_search():
    r = largest_fitting(lambda b: True, 8, 100, 8, budget_s=60, log=lambda *_: None)
    assert r["max_batch"] == 100 and r["first_failure"] is None and r["exact"]
    r = largest_fitting(lambda b: b <= 300, 8, 1024, 8, budget_s=0, log=lambda *_: None)
    assert r["max_batch"] == 8 and not r["exact"]  # one probe, then out of time


def test_only_out_of_memory_errors_count_as_not_fitting():
    assert is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
    assert is_oom(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_oom(ValueError("shapes do not match"))
