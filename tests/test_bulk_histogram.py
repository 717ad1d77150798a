"""The bulk histogram: one call per tensor, the same exposition as prometheus_client's Histogram."""

import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.bulk_histogram import BulkHistogram

BUCKETS = (0, 1, 2.5, 5, 10)


def exposition_lines(registry: CollectorRegistry, prefix: str) -> list[str]:
    # The reference Histogram also exports a `_created` timestamp, which differs by construction.
    return [line for line in generate_latest(registry).decode().splitlines()
            if line.startswith(prefix) and "_created" not in line]


def test_bulk_observations_expose_the_same_series_as_one_by_one_observations():
    values = torch.tensor([0.0, 0.5, 1.0, 1.0001, 2.5, 3.0, 7.0, 10.0, 11.0, 250.0])
    reference_registry, bulk_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "x", ("kind",), buckets=BUCKETS, registry=reference_registry)
    bulk = BulkHistogram("x_seconds", "x", ("kind",), buckets=BUCKETS, registry=bulk_registry)
    for v in values.tolist():
        reference.labels("a").observe(v)
    bulk.labels("a").observe_many(values[:4])
    bulk.labels("a").observe_many(values[4:])
    assert exposition_lines(bulk_registry, "x_seconds") == exposition_lines(reference_registry, "x_seconds")


def test_a_series_named_before_any_observation_is_exported_at_zero():
    registry = CollectorRegistry()
    BulkHistogram("y", "y", ("kind",), buckets=BUCKETS, registry=registry).labels("b")
    assert 'y_count{kind="b"} 0.0' in exposition_lines(registry, "y")


def test_an_unlabelled_histogram_takes_observations_directly():
    registry = CollectorRegistry()
    histogram = BulkHistogram("z", "z", buckets=BUCKETS, registry=registry)
    histogram.observe_many(torch.tensor([[1, 2], [3, 40]]))
    lines = exposition_lines(registry, "z")
    assert 'z_bucket{le="2.5"} 2.0' in lines and 'z_bucket{le="+Inf"} 4.0' in lines and "z_sum 46.0" in lines
