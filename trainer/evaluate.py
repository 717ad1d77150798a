"""Evaluation on held-out tokens: MSE, FVU, L0, loss recovered, dead/dense fractions, density histogram.

Definitions: FVU = E‖x − x̂‖² / E‖x − E[x]‖² (centred by the data's mean; Gao et al. 2024's normalised MSE); loss
recovered = (H_zero − H_spliced) / (H_zero − H_clean), the formula of SAELens' ce_loss_score, SAEBench's "Loss
Recovered" and dictionary_learning's frac_recovered, with H_zero the CE when the hook's activation is set to 0
(for the MLP post-activation this zero-ablates the neurons and keeps the MLP's output bias). The BOS position is
neither spliced nor counted, as in SAEBench, since the dictionary is not trained on it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from monosemantic.feature_stats import FeatureStatistics
from monosemantic.lm import LoadedLM, hooked_replacement, resolve_hook
from monosemantic.sae import SparseAutoencoder
from trainer.paired import split_pair
from trainer.progress import progress as progress_bar

DENSE_THRESHOLD = 0.10  # SAEBench freq_over_10_percent; Bricken: many features > 1% means λ too low
HISTOGRAM_EDGES = torch.arange(-8.0, 0.01, 0.5)  # log10 density bins, 1e-8 … 1


@dataclass
class ReconstructionAccumulator:
    """Streams over batches of (x, f, x̂) and keeps only sums, so any number of tokens fits in memory."""

    d_sae: int
    tokens: int = 0
    squared_error: float = 0.0
    sum_x: Tensor | None = None
    sum_x_squared: float = 0.0
    active: float = 0.0
    fires: Tensor = field(init=False)
    max_activation: Tensor = field(init=False)
    sum_activation: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64)
        self.max_activation = torch.zeros(self.d_sae)
        self.sum_activation = torch.zeros(self.d_sae, dtype=torch.float64)

    def add(self, x: Tensor, features: Tensor, x_hat: Tensor) -> None:
        x, x_hat, features = x.float(), x_hat.float(), features.float()
        self.tokens += x.shape[0]
        self.squared_error += float((x - x_hat).pow(2).sum())
        self.sum_x = x.sum(0).double() if self.sum_x is None else self.sum_x + x.sum(0).double()
        self.sum_x_squared += float(x.double().pow(2).sum())
        firing = features > 0
        self.active += float(firing.sum())
        self.fires += firing.sum(0).double()
        self.sum_activation += features.sum(0).double()
        self.max_activation = torch.maximum(self.max_activation, features.max(0).values)

    def metrics(self) -> dict:
        n = max(self.tokens, 1)
        total_variance = self.sum_x_squared / n - float((self.sum_x / n).pow(2).sum())
        density = self.fires / n
        histogram = torch.histc(torch.log10(density.float() + 1e-10), bins=len(HISTOGRAM_EDGES) - 1,
                                min=float(HISTOGRAM_EDGES[0]), max=float(HISTOGRAM_EDGES[-1]))
        return {
            "tokens": self.tokens,
            "mse": self.squared_error / n,
            "fvu": (self.squared_error / n) / max(total_variance, 1e-12),
            "l0": self.active / n,
            "dead_fraction": float((density == 0).float().mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).float().mean()),
            "over_1_percent_fraction": float((density > 0.01).float().mean()),
            "density_histogram": {"log10_edges": HISTOGRAM_EDGES.tolist(), "counts": histogram.int().tolist(),
                                  "dead": int((density == 0).sum())},
        }

    def feature_statistics(self) -> dict[str, Tensor]:
        """Per-feature tensors stored in features.safetensors: the layout's required three
        (monosemantic/feature_stats.py); trainer/features.py adds the dashboards' tensors."""
        n = max(self.tokens, 1)
        return FeatureStatistics(
            density=(self.fires / n).float(),
            mean_activation=(self.sum_activation / self.fires.clamp_min(1)).float(),
            max_activation=self.max_activation.float(),
        ).to_tensors()


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """Reconstruction metrics over activation batches (no model needed); a transcoder's batches are paired rows
    (trainer/paired.py) and its FVU is of the output it predicts."""
    acc = ReconstructionAccumulator(sae.cfg.d_sae)
    for rows in batches:
        x, y = split_pair(rows.float(), sae.cfg.d_in) if sae.reads_pairs else (rows.float(), rows)
        features = sae.encode(x)
        acc.add(y, features, sae.reconstruct(x, features))
    return acc.metrics(), acc.feature_statistics()


def _cross_entropy(logits: Tensor, input_ids: Tensor) -> tuple[float, int]:
    predictions = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    loss = F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(loss), targets.numel()


@torch.no_grad()
def model_metrics(lm: LoadedLM, sae: SparseAutoencoder, hook: str, contexts: Tensor, batch_size: int = 16,
                  progress: bool = True, hook_out: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """Everything ``evaluate`` reports, on held-out contexts [n, ctx] starting with BOS. A transcoder reads at
    ``hook`` and replaces ``hook_out`` (the MLP's output by its prediction: the loss recovered with the transcoder
    standing in for the MLP, zero-ablation there too)."""
    hook_point = resolve_hook(lm.model, hook)
    written = resolve_hook(lm.model, hook_out) if hook_out is not None else hook_point
    acc = ReconstructionAccumulator(sae.cfg.d_sae)
    ce = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    count = 0
    read: list[Tensor] = []  # a transcoder's input, seen at hook before its output is replaced at hook_out

    def capture(x: Tensor) -> Tensor:
        read[:] = [x[:, 1:].reshape(-1, x.shape[-1]).float()]
        return x

    def splice(y: Tensor) -> Tensor:
        target = y[:, 1:].reshape(-1, y.shape[-1]).float()
        x = read[0] if hook_out is not None else target
        features = sae.encode(x)
        y_hat = sae.reconstruct(x, features)
        acc.add(target, features, y_hat)
        out = y.clone()
        out[:, 1:] = y_hat.reshape(y.shape[0], -1, y.shape[-1]).to(y.dtype)
        return out

    def zero(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, 1:] = 0
        return out

    for b in progress_bar(range(0, contexts.shape[0], batch_size), desc="evaluate", unit="batch", enabled=progress):
        ids = contexts[b : b + batch_size].to(lm.model.device)
        loss, n = _cross_entropy(lm.model(input_ids=ids, use_cache=False).logits, ids)
        ce["clean"] += loss
        for key, fn in (("spliced", splice), ("zero_ablated", zero)):
            with ExitStack() as hooks:
                if hook_out is not None:
                    hooks.enter_context(hooked_replacement(lm.model, hook_point, capture))
                hooks.enter_context(hooked_replacement(lm.model, written, fn))
                loss, _ = _cross_entropy(lm.model(input_ids=ids, use_cache=False).logits, ids)
            ce[key] += loss
        count += n
    metrics, statistics = acc.metrics(), acc.feature_statistics()
    clean, spliced, zeroed = (ce[k] / max(count, 1) for k in ("clean", "spliced", "zero_ablated"))
    metrics.update({
        "ce_loss_clean": clean, "ce_loss_spliced": spliced, "ce_loss_zero_ablated": zeroed,
        "ce_loss_delta": spliced - clean,
        "loss_recovered": (zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan"),
        "predicted_tokens": count,
    })
    return metrics, statistics
