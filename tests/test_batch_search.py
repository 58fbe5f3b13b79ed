"""The package's one largest-batch search (`planning/search.py`: bench/unet_step.py's
`--find-max-batch`, `smartbrush-aot --find-max-batch`), against a closed form: a fake step
that fits exactly up to a known batch."""

import pytest

from smartbrush_jax.planning.search import Probe, is_oom, largest_batch


def largest_fitting(fits, start, limit, granularity, budget_s, log=None):
    """The search as bench/unet_step.py runs it: a probe that says fits or not, no memory figure."""
    return largest_batch(lambda b: Probe(fits(b)), start, limit=limit, granularity=granularity, budget_s=budget_s)


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
    probes = []

    def fits(b):
        probes.append(b)
        return Probe(1e9 + 0.3e9 * b <= 80e9, total_bytes=1e9 + 0.3e9 * b)

    r = largest_batch(fits, 8, capacity=80e9, limit=1024, budget_s=60)
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
