"""BatchTopK (Bussmann, Leask & Nanda 2024, arXiv 2412.06410): TopK's budget of k latents per token spent over the
whole batch, and served as a JumpReLU with one threshold shared by every latent.

Training keeps the k·batch largest (positive) pre-activations of the batch, so a token may use more or fewer than k
latents: the easy tokens lend their budget to the hard ones. Inference cannot see a batch, so the threshold that
selection implied is estimated while training — a running mean of the smallest activation kept, as SAELens's
``BatchTopKTrainingSAE`` does (at a faster rate, below) — and the trained dictionary encodes ``z·1{z > θ}``: per-token
L0 varies and averages about k. In eval mode this class is exactly a JumpReLU with ``threshold = θ`` for every
latent, stored under that name ([d_sae], one value repeated) so other tools read it as SAELens's ``jumprelu``
(``exports_as``). Dead latents get AuxK's gradient as in TopK (Gao et al. 2024 §2.4), inherited.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from monosemantic.block_topk import topk_indices
from monosemantic.errors import ConfigError
from monosemantic.sae import SAEConfig, SAEOutput, SparseAutoencoder, TopKSAE, register
from monosemantic.support import Support


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    tensor_names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    exports_as = "jumprelu"
    # The running mean's weight on each batch. SAELens's 0.01 lags a threshold still falling: on 128 planted features
    # in 32 dimensions (d_sae 256, k 4, 200 steps of 1,024) the batch minimum fell 2.8 -> 1.18 and a 0.01 mean ended
    # at 1.47, serving L0 2.72 for k 4; 0.05 ended at 1.184 (L0 3.97), as did 0.1 and 0.2.
    THRESHOLD_RATE: ClassVar[float] = 0.05
    # Started as ReLU is (b_enc where each latent is positive on 2k/d_sae of a sample): the batch-wide selection
    # otherwise hands most of its k·batch slots to the latents whose random encoder rows start largest, and the rest
    # learn late. bench/quality.py's gt-128 case (d_sae 2,048, k 8, 488 steps): MMCS 0.894 → 0.966, Matryoshka
    # 0.805 → 0.899. TopK is left uncalibrated: its per-row top-k is indifferent to a latent's share, and a negative
    # bias only left rows short of k (served L0 7.4 for 8).
    calibrated_start = True

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        # A persistent buffer: checkpointed and restored with the weights (Trainer.save_checkpoint), never a parameter.
        # 0 until the first training batch sets it: an untrained BatchTopK encodes as a ReLU.
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    # ---- training: the batch's k·batch largest ----------------------------------------------------
    def batch_selection(self, pre: Tensor) -> Tensor:
        """Flat positions in ``pre`` [rows, d_sae] of the batch's k·rows largest pre-activations that are positive;
        in training, the running threshold moves toward the smallest of them."""
        flat = pre.detach().reshape(-1)
        budget = min(self.cfg.k * pre.shape[0], flat.numel())
        # topk_indices over one row of rows·d_sae values: its block maxima make this a read of the batch, not a sort.
        chosen = topk_indices(flat.unsqueeze(0), budget).squeeze(0)
        kept = flat[chosen]
        positive = kept > 0
        chosen, kept = chosen[positive], kept[positive]
        if self.training and kept.numel():
            smallest = kept.min().float()
            # The first batch sets it (a mean from 0 would take ~100 steps to arrive); kept values are > 0, so 0 means unset.
            if not bool(self.threshold.any()):
                self.threshold.fill_(smallest)
            else:
                self.threshold.mul_(1 - self.THRESHOLD_RATE).add_(self.THRESHOLD_RATE * smallest)
        return chosen

    def _batch_activate(self, pre: Tensor) -> Tensor:
        flat = pre.reshape(-1, self.cfg.d_sae)
        chosen = self.batch_selection(flat)
        values = flat.reshape(-1).gather(0, chosen)
        return torch.zeros_like(flat).reshape(-1).scatter(0, chosen, values).reshape(pre.shape)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        if not self.training:
            return SparseAutoencoder.forward(self, x, dead_mask)  # the JumpReLU it is served as
        x_n = x * self.cfg.input_scale
        pre = self.pre_activations(x_n).reshape(-1, self.cfg.d_sae)
        features = self._batch_activate(pre)
        x_hat_n = features @ self.W_dec + self.b_dec
        error = x_n.float() - x_hat_n.float()
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and bool(dead_mask.any()):
            aux = self.AUX_COEFFICIENT * self._aux_loss(pre, error.detach(), dead_mask)
        active = features.detach() != 0
        return SAEOutput(
            x_hat=x_hat_n / self.cfg.input_scale, features=features, mse=error.pow(2).sum(-1).mean(),
            sparsity=torch.zeros((), device=x.device), aux=aux,
            l0=active.sum(-1, dtype=torch.float32).mean(), fired=active.any(0),
        )

    def support(self, pre: Tensor) -> Support:
        if not self.training:
            return Support.from_mask(pre > self.threshold.to(pre.dtype))
        return Support.from_flat(self.batch_selection(pre), pre.shape[0], self.cfg.d_sae)

    # ---- inference: JumpReLU at the shared threshold ---------------------------------------------
    def activate(self, pre: Tensor) -> Tensor:
        if self.training:
            return self._batch_activate(pre)
        return pre * (pre > self.threshold.to(pre.dtype))

    def activate_(self, pre: Tensor) -> Tensor:
        if self.training:
            return self._batch_activate(pre)
        return pre.masked_fill_(pre <= self.threshold.to(pre.dtype), 0)

    def activate_at(self, pre_at: Tensor, ids: Tensor) -> Tensor:
        return pre_at.masked_fill(pre_at <= self.threshold[ids].to(pre_at.dtype), 0)

    # ---- tensors as stored: SAELens's JumpReLU layout (tensor_names; the base class reads and writes them) ----
    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        threshold = tensors.get("threshold")
        if threshold is not None and threshold.numel() and not bool((threshold == threshold.reshape(-1)[0]).all()):
            raise ConfigError("tensor threshold differs between features: a batchtopk dictionary has one threshold "
                              "shared by every feature (load it as jumprelu)")
        if threshold is not None and (bool((threshold < 0).any()) or not bool(torch.isfinite(threshold).all())):
            raise ConfigError("tensor threshold must be finite and at least 0")
        super().load_tensors(tensors)  # the shapes, then every tensor, the threshold buffer among them
