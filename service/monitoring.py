"""Feature monitoring: watched features' firings and the live reconstruction quality of served text, exported to
Prometheus beside what the dictionary saw in training, so an alert can say when traffic drifts from it.

Series (labels come from settings and the loaded dictionaries' manifests, never from user input; `dictionary` is a
loaded dictionary's name, `dictionary_version` its version):
- monosemantic_watched_feature_fires_total{dictionary,feature,name,dictionary_version}: tokens on which it fired;
- monosemantic_watched_feature_activation{…}: its activation where it fired (histogram);
- monosemantic_watched_feature_training_density{…}: its firing density in the dictionary's feature statistics,
  to compare with rate(fires_total) / rate(monosemantic_observed_tokens_total);
- monosemantic_observed_tokens_total{dictionary,dictionary_version}: tokens read (BOS excluded, as in training);
- monosemantic_reconstruction_relative_error{dictionary}: ||x − x̂|| / ||x|| per token (histogram), and the sums
  monosemantic_reconstruction_squared_error_total / monosemantic_activation_squared_norm_total{dictionary};
- monosemantic_dictionary_evaluation{metric,dictionary,dictionary_version}: the manifest's held-out metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.bulk_histogram import BulkHistogram
from monosemantic.readout import SequenceReadout
from service.settings import WatchedFeature

ACTIVATION_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 2, 3, 5, 8, 13, 20, 30, 50, 100)
ERROR_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5)
EVALUATION_METRICS = ("l0", "fvu", "mse", "loss_recovered", "dead_fraction", "dense_fraction")


class FeatureMonitor:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._watch: dict[str, list[WatchedFeature]] = {}  # dictionary name -> its watched features
        self._gauges: dict[str, list[tuple[Gauge, tuple[str, ...]]]] = {}  # dictionary name -> the gauge series it set
        labels = ("dictionary", "feature", "name", "dictionary_version")
        self.fires = Counter("monosemantic_watched_feature_fires", "Tokens on which a watched feature fired.", labels, registry=registry)
        self.activation = BulkHistogram("monosemantic_watched_feature_activation", "A watched feature's activation where it fired.", labels, buckets=ACTIVATION_BUCKETS, registry=registry)
        self.training_density = Gauge("monosemantic_watched_feature_training_density", "A watched feature's firing density in the dictionary's feature statistics.", labels, registry=registry)
        self.tokens = Counter("monosemantic_observed_tokens", "Tokens read from served text (BOS excluded).", ("dictionary", "dictionary_version"), registry=registry)
        self.relative_error = BulkHistogram("monosemantic_reconstruction_relative_error", "Per-token ||x - x_hat|| / ||x|| of served text.", ("dictionary",), buckets=ERROR_BUCKETS, registry=registry)
        self.squared_error = Counter("monosemantic_reconstruction_squared_error", "Sum over served tokens of ||x - x_hat||^2.", ("dictionary",), registry=registry)
        self.squared_norm = Counter("monosemantic_activation_squared_norm", "Sum over served tokens of ||x||^2.", ("dictionary",), registry=registry)
        self.evaluation = Gauge("monosemantic_dictionary_evaluation", "A loaded dictionary's held-out evaluation metrics from its manifest.", ("metric", "dictionary", "dictionary_version"), registry=registry)

    def watched(self, dictionary: str) -> list[int]:
        return [w.id for w in self._watch.get(dictionary, [])]

    def set_dictionary(self, dictionary: str, version: int, metrics: dict, density: "object | None", watch: list[WatchedFeature]) -> None:
        """Export a newly loaded dictionary's baselines (and create its series at 0, so rates exist from the start);
        a version it replaced loses its evaluation gauges."""
        self.remove_dictionary(dictionary)
        self._watch[dictionary] = watch
        gauges = self._gauges[dictionary] = []
        for metric in EVALUATION_METRICS:
            value = metrics.get(metric)
            if isinstance(value, (int, float)):
                gauges.append((self.evaluation, (metric, dictionary, str(version))))
                self.evaluation.labels(*gauges[-1][1]).set(float(value))
        self.tokens.labels(dictionary, str(version))
        self.relative_error.labels(dictionary)
        self.squared_error.labels(dictionary)
        self.squared_norm.labels(dictionary)
        for watched in watch:
            labels = (dictionary, str(watched.id), watched.name, str(version))
            self.fires.labels(*labels)
            self.activation.labels(*labels)
            if density is not None:
                gauges.append((self.training_density, labels))
                self.training_density.labels(*labels).set(float(density[watched.id]))

    def remove_dictionary(self, dictionary: str) -> None:
        """Gauges describe what is loaded: an unloaded (or replaced) dictionary's go; its counters stay, as counters do."""
        for gauge, labels in self._gauges.pop(dictionary, []):
            gauge.remove(*labels)
        self._watch.pop(dictionary, None)

    def record(self, dictionary: str, version: int, readout: SequenceReadout, skip_first: bool, l0_histogram: BulkHistogram) -> None:
        start = 1 if skip_first else 0
        tokens = readout.l0.shape[0] - start
        if tokens <= 0:
            return
        self.tokens.labels(dictionary, str(version)).inc(tokens)
        l0_histogram.labels(dictionary).observe_many(readout.l0[start:])
        self.relative_error.labels(dictionary).observe_many(readout.recon_error[start:])
        self.squared_error.labels(dictionary).inc(float(readout.squared_error[start:].sum()))
        self.squared_norm.labels(dictionary).inc(float(readout.squared_norm[start:].sum()))
        watch = self._watch.get(dictionary)
        if readout.watched is None or not watch:
            return
        values = readout.watched[start:]
        for column, watched in enumerate(watch):
            fired = values[:, column][values[:, column] > 0]
            if fired.numel():
                labels = (dictionary, str(watched.id), watched.name, str(version))
                self.fires.labels(*labels).inc(fired.numel())
                self.activation.labels(*labels).observe_many(fired)
