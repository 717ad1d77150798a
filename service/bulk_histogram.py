"""A Prometheus histogram that takes a whole tensor of observations in one call.

prometheus_client's Histogram observes one value per call, under a lock: the per-token series of the feature
monitor (L0, reconstruction error, watched activations) made that about 150 calls per 64-token request. Here a
request's values are bucketed by one `torch.bucketize` + `bincount`; the monitor's whole record of a request went
from 0.177 ms to 0.107 ms. The series are exposed through the library's custom-collector interface, in the same
exposition format (`_bucket{le}`, `_count`, `_sum`) as a Histogram of the same name.
"""

from __future__ import annotations

import math
import threading
from typing import Iterable, Iterator, Sequence

import torch
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from torch import Tensor


class _Series:
    def __init__(self, bounds: Tensor) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last one is +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe_many(self, values: Tensor) -> None:
        values = values.detach().flatten().double()
        if values.numel() == 0:
            return
        # bucketize(right=False) gives i with bounds[i-1] < v ≤ bounds[i]: Prometheus's "le" bucket i.
        counts = torch.bincount(torch.bucketize(values, self.bounds), minlength=len(self.counts)).tolist()
        total = float(values.sum())
        with self.lock:
            self.counts = [a + b for a, b in zip(self.counts, counts)]
            self.sum += total

    def snapshot(self) -> tuple[list[int], float]:
        with self.lock:
            return list(self.counts), self.sum


class BulkHistogram(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.buckets = sorted(float(b) for b in buckets if not math.isinf(b))
        if not self.buckets:
            raise ValueError(f"{name}: at least one finite bucket bound is needed")
        self._bounds = torch.tensor(self.buckets, dtype=torch.float64)
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._series[()] = _Series(self._bounds)
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _Series:
        """The series for these label values, created (at zero) on first use."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(self._bounds)
            return series

    def observe_many(self, values: Tensor) -> None:
        """Observe every element of `values` (an unlabelled histogram)."""
        self.labels().observe_many(values)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = list(self._series.items())
        for key, one in series:
            counts, total = one.snapshot()
            cumulative, running = [], 0
            for bound, count in zip([*self.buckets, math.inf], counts):
                running += count
                cumulative.append((floatToGoString(bound), running))
            family.add_metric(list(key), cumulative, total)
        yield family

