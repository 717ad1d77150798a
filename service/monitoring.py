"""Feature monitoring: watched features' firings and the live reconstruction quality of served text, exported to
Prometheus beside what the dictionary saw in training, so an alert can say when traffic drifts from it.

Series (labels come from settings and the manifest, never from user input):
- monosemantic_watched_feature_fires_total{feature,name,dictionary_version}: tokens on which it fired;
- monosemantic_watched_feature_activation{…}: its activation where it fired (histogram);
- monosemantic_watched_feature_training_density{…}: its firing density in the dictionary's feature statistics,
  to compare with rate(fires_total) / rate(monosemantic_observed_tokens_total);
- monosemantic_observed_tokens_total{dictionary_version}: tokens read (BOS excluded, as in training);
- monosemantic_reconstruction_relative_error: ||x − x̂|| / ||x|| per token (histogram), and the sums
  monosemantic_reconstruction_squared_error_total / monosemantic_activation_squared_norm_total;
- monosemantic_dictionary_evaluation{metric,dictionary_version}: the manifest's held-out metrics (l0, fvu, …).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.bulk_histogram import BulkHistogram
from service.readout import SequenceReadout
from service.settings import WatchedFeature

ACTIVATION_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 2, 3, 5, 8, 13, 20, 30, 50, 100)
ERROR_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5)
EVALUATION_METRICS = ("l0", "fvu", "mse", "loss_recovered", "dead_fraction", "dense_fraction")


class FeatureMonitor:
    def __init__(self, registry: CollectorRegistry, watch: list[WatchedFeature]) -> None:
        self.watch = watch
        self.ids = [w.id for w in watch]
        labels = ("feature", "name", "dictionary_version")
        self.fires = Counter("monosemantic_watched_feature_fires", "Tokens on which a watched feature fired.", labels, registry=registry)
        self.activation = BulkHistogram("monosemantic_watched_feature_activation", "A watched feature's activation where it fired.", labels, buckets=ACTIVATION_BUCKETS, registry=registry)
        self.training_density = Gauge("monosemantic_watched_feature_training_density", "A watched feature's firing density in the dictionary's feature statistics.", labels, registry=registry)
        self.tokens = Counter("monosemantic_observed_tokens", "Tokens read from served text (BOS excluded).", ("dictionary_version",), registry=registry)
        self.relative_error = BulkHistogram("monosemantic_reconstruction_relative_error", "Per-token ||x - x_hat|| / ||x|| of served text.", buckets=ERROR_BUCKETS, registry=registry)
        self.squared_error = Counter("monosemantic_reconstruction_squared_error", "Sum over served tokens of ||x - x_hat||^2.", registry=registry)
        self.squared_norm = Counter("monosemantic_activation_squared_norm", "Sum over served tokens of ||x||^2.", registry=registry)
        self.evaluation = Gauge("monosemantic_dictionary_evaluation", "The serving dictionary's held-out evaluation metrics from its manifest.", ("metric", "dictionary_version"), registry=registry)

    def _labels(self, watched: WatchedFeature, version: int) -> tuple[str, str, str]:
        return str(watched.id), watched.name, str(version)

    def set_dictionary(self, version: int, metrics: dict, density: "object | None") -> None:
        """Export the new dictionary's baselines (and create its series at 0, so rates exist from the start)."""
        self.evaluation.clear()
        for metric in EVALUATION_METRICS:
            value = metrics.get(metric)
            if isinstance(value, (int, float)):
                self.evaluation.labels(metric, str(version)).set(float(value))
        self.tokens.labels(str(version))
        for watched in self.watch:
            labels = self._labels(watched, version)
            self.fires.labels(*labels)
            self.activation.labels(*labels)
            if density is not None:
                self.training_density.labels(*labels).set(float(density[watched.id]))

    def record(self, version: int, readout: SequenceReadout, skip_first: bool, l0_histogram: BulkHistogram) -> None:
        start = 1 if skip_first else 0
        tokens = readout.l0.shape[0] - start
        if tokens <= 0:
            return
        self.tokens.labels(str(version)).inc(tokens)
        l0_histogram.observe_many(readout.l0[start:])
        self.relative_error.observe_many(readout.recon_error[start:])
        self.squared_error.inc(float(readout.squared_error[start:].sum()))
        self.squared_norm.inc(float(readout.squared_norm[start:].sum()))
        if readout.watched is None:
            return
        values = readout.watched[start:]
        for column, watched in enumerate(self.watch):
            fired = values[:, column][values[:, column] > 0]
            if fired.numel():
                labels = self._labels(watched, version)
                self.fires.labels(*labels).inc(fired.numel())
                self.activation.labels(*labels).observe_many(fired)
