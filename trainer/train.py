"""SAE training: Adam with warm-up and decay, sparsity warm-up and a target-L0 controller, dead-feature
resampling (ReLU) or AuxK (TopK), bf16 mixed precision on CPU, checkpoints and exact resume.

What differs between architectures (default λ, a fixed k, the controller, resampling, AuxK, a learned threshold) is
declared by each architecture's class in monosemantic/sae.py and read here through ``architecture_class``: the
trainer never compares architecture names, so a newly registered architecture trains without edits here."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from monosemantic.errors import ConfigError, MonosemanticError, TrainingDiverged, describe_validation_error
from monosemantic.precision import fastest_dtype
from monosemantic.sae import (Architecture, SAEConfig, SparseAutoencoder, architecture_class, architectures_where,
                               build_sae, geometric_median, nested_widths_problem)
from trainer.activations import ActivationSource, DataError
from trainer.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from trainer.progress import progress as progress_bar

# The default learning rate: sparsify's (and Gao et al. 2024's) width rule, 2e-4 at 2^14 latents scaled by
# 1/sqrt(latents), times 1/sqrt(steps / 8,000). The second factor is the horizon: the best Adam lr falls with the length of the run
# (Bjorck et al. 2024, "Scaling Optimal LR Across Token Horizons"), and at a fixed number of rows 1/sqrt(steps) is
# sqrt(batch / rows), the square-root batch rule for Adam (Malladi et al. 2022). 8,000 steps and the cap are measured
# (bench/RESULTS.md, "The learning rate from the width and the budget"): a fixed 4e-4 was 4-8x too low at ~500
# steps (reference harvest, TopK k 24, 244 steps: FVU 0.214 at 4e-4, 0.141 at 1.6e-3), and the cap is where more
# stopped paying: at 3.2e-3 that run reached 0.131 with 16% of latents dead (2% at 1.6e-3), and a ReLU's L0 swung
# around its controller's target (2.2 at the end for 5, 36% dead, on bench/quality.py's gt-64 case).
LR_AT_2_14_LATENTS, LR_REFERENCE_STEPS, LR_CAP = 2e-4, 8_000, 1.6e-3


def clip_gradients(parameters: list[Tensor], max_norm: float) -> float:
    """The gradients' total norm, after scaling them to ``max_norm`` where it is larger: what
    ``torch.nn.utils.clip_grad_norm_`` does, the same coefficient, but without its multiply when the coefficient is 1
    (it always multiplies, to avoid reading the norm on the host; the step reads it anyway, for the divergence
    check). That multiply was a full pass over every gradient each step: ~4 ms at 768 → 16,384."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(gradients)
    norm = float(total)
    if math.isfinite(norm) and max_norm / (norm + 1e-6) < 1:  # clip_grad_norm_'s coefficient, clamped at 1
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return norm


def default_lr(d_sae: int, steps: int) -> float:
    """Adam's learning rate for a dictionary of ``d_sae`` latents trained for ``steps`` steps (see LR_REFERENCE_STEPS)."""
    return min(LR_CAP, LR_AT_2_14_LATENTS * math.sqrt(2**14 / d_sae) * math.sqrt(LR_REFERENCE_STEPS / max(1, steps)))


# The L0 controller's gain: fast enough that λ can move e-fold (at the largest error it acts on, 0.5 in log L0) within a
# third of the steps it steers (after the sparsity warm-up, before the decay), never slower than 0.005 a step, the
# gain a 9,765-step run (the shipped reference) settles with. At a fixed 0.005, a 244-step run moved λ by at most
# 0.25% a step over ~180 steps, so its L0 was set by its start and λ's default, not by its target (bench/RESULTS.md,
# "ReLU, JumpReLU and gated, trained by us and by SAELens").
CONTROLLER_FLOOR_GAIN, CONTROLLER_EFOLDS_PER_THIRD = 0.005, 1.0


def default_controller_gain(cfg: "TrainConfig") -> float:
    steered = max(1.0, (1 - cfg.lr_decay_fraction - cfg.sparsity_warmup_fraction) * cfg.steps)
    return max(CONTROLLER_FLOOR_GAIN, CONTROLLER_EFOLDS_PER_THIRD / (0.5 * steered / 3))


# A reconstruction error this many times the data's variance is a run that has diverged (a learning rate far too
# high: --lr 1e6 reached FVU 2e30), not one still learning: an untrained dictionary starts near FVU 1.
DIVERGED_FVU = 1e3


class TrainConfig(BaseModel):
    """Everything that determines a training run; recorded in the published manifest."""

    model_config = ConfigDict(extra="forbid")

    architecture: Architecture = "relu"
    d_sae: int = Field(default=4096, gt=0)
    k: int | None = Field(default=None, gt=0, description="TopK: active latents per token (default: target_l0 or 32)")
    sparsity_coefficient: float | None = Field(default=None, ge=0, description="λ: L1 (relu, gated) or L0 (jumprelu) coefficient")
    target_l0: float | None = Field(default=None, gt=0, description="steer λ so the running L0 approaches this")
    tokens: int = Field(default=20_000_000, gt=0, description="training tokens (activation rows) to consume")
    batch_size: int = Field(default=4096, gt=0)
    lr: float | None = Field(default=None, gt=0, description="Adam's learning rate (default: default_lr's rule, from "
                                                                   "d_sae and the number of steps; recorded resolved)")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_fraction: float = Field(default=0.01, ge=0, le=1)
    lr_decay_fraction: float = Field(default=0.2, ge=0, le=1, description="linear decay to 0 over this final share")
    sparsity_warmup_fraction: float = Field(default=0.05, ge=0, le=1)
    controller_gain: float | None = Field(
        default=None, ge=0, description="per-step log-λ change per unit log L0 error (default: default_controller_gain, "
                                        "from the number of steps; recorded resolved)")
    grad_clip: float = Field(default=1.0, gt=0)
    # Every 5% of the run until 75%: on the reference harvest (4M tokens) this left 23% of features dead at the end
    # against 64% with resampling at 10-50% only, and a lower FVU (0.24 against 0.25); features that die after the
    # last resample have no second chance, so resampling goes on until the learning rate starts to anneal.
    resample_fractions: tuple[float, ...] = Field(default=tuple(round(0.05 * i, 2) for i in range(1, 16)),
                                                  description="ReLU: when to resample dead features")
    dead_window_tokens: int | None = Field(default=None, gt=0, description="a feature unfired this long is dead")
    bandwidth: float = Field(default=0.05, gt=0, description="JumpReLU STE bandwidth (normalised units)")
    matryoshka_widths: tuple[int, ...] | None = Field(
        default=None, description="Matryoshka: nested prefix widths ending at d_sae (default d_sae/16, d_sae/4, d_sae)")
    initial_firing_rate: float | None = Field(
        default=None, gt=0, lt=1,
        description="ReLU, JumpReLU, BatchTopK: b_enc starts where each feature fires on this share of a data sample "
                    "(default: 2·target_l0/d_sae or 2k/d_sae, or 1% without a target)")
    bf16: bool = Field(default=True, description="bf16 autocast for the matmuls (fp32 master weights)")
    sparse_step_density: float = Field(
        default=0.04, ge=0, le=1,
        description="take the support-restricted step (monosemantic/support.py) while L0 is below this share of "
                    "d_sae; 0 always takes the dense step")
    seed: int = Field(default=0, ge=0)
    log_every: int = Field(default=50, gt=0)
    checkpoint_every: int = Field(default=500, gt=0, description="steps between checkpoints")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        # A setting the chosen architecture ignores is refused: a user who gave it expected it to act.
        arch, name = self.architecture_class, self.architecture
        if self.k is not None and not arch.takes_k:
            raise ValueError(f"k applies to {_names(lambda c: c.takes_k)} only, not {name} "
                             "(use target_l0 to set its sparsity)")
        if arch.takes_k and self.k is not None and self.target_l0 is not None:
            raise ValueError(f"{name} takes k or target_l0 (used as k), not both")
        if not arch.has_sparsity_coefficient and self.sparsity_coefficient is not None:
            raise ValueError(f"{name} has no sparsity coefficient"
                             + (" (its sparsity is k)" if arch.takes_k else ""))
        if self.initial_firing_rate is not None and not arch.calibrated_start:
            raise ValueError(f"initial_firing_rate applies to {_names(lambda c: c.calibrated_start)} only, not {name}")
        if arch.takes_k and self.k is not None and self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        problem = nested_widths_problem(self.resolved_widths(), self.d_sae, arch)
        if problem:
            raise ValueError(problem)
        if self.target_l0 is not None and self.target_l0 >= self.d_sae:
            raise ValueError(f"target_l0 ({self.target_l0:g}) must be below d_sae ({self.d_sae})")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ValueError("lr_warmup_fraction + lr_decay_fraction must not exceed 1")
        if self.lr is None:
            # Resolved here so the manifest and a checkpoint record the value used; written past pydantic's
            # __setattr__ so it stays out of model_fields_set (the summary marks it a default).
            self.__dict__["lr"] = default_lr(self.d_sae, self.steps)
        if self.controller_gain is None:
            self.__dict__["controller_gain"] = default_controller_gain(self)
        return self

    @classmethod
    def build(cls, **fields: object) -> "TrainConfig":
        """The config from options, those left as None taking their defaults; bf16 left as None is measured: on
        only where this machine multiplies bf16 faster than fp32 (on an EPYC without avx512_bf16 a TopK step ran
        orders of magnitude slower in bf16). The measured value is what the manifest records."""
        if fields.get("bf16") is None:
            fields["bf16"] = fastest_dtype(512, 4096, "cpu") == torch.bfloat16
        try:
            return cls(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "training config")) from None

    @property
    def architecture_class(self) -> type[SparseAutoencoder]:
        """The registered class of ``architecture``: what the trainer asks about it (monosemantic/sae.py)."""
        return architecture_class(self.architecture)

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def summary(self) -> str:
        """The settings that decide the result, each marked where it is a default the user did not give."""
        def show(name: str, value: object) -> str:
            return f"{name} {value}" + ("" if name in self.model_fields_set else " (default)")

        parts = [self.architecture, show("d_sae", self.d_sae)]
        if self.architecture_class.takes_k:
            parts.append(f"k {self.resolved_k()}" + ("" if {"k", "target_l0"} & self.model_fields_set else " (default)"))
        elif self.sparsity_coefficient is not None:
            parts.append(show("sparsity_coefficient", self.sparsity_coefficient))
        else:
            parts.append(show("target_l0", self.target_l0))
        parts += [show("tokens", f"{self.tokens:,}"), show("batch_size", self.batch_size), show("lr", f"{self.lr:.3g}"), show("seed", self.seed),
                  f"bf16 {'on' if self.bf16 else 'off'}"]
        return ", ".join(parts)

    def resolved_widths(self) -> tuple[int, ...] | None:
        """The nested prefixes' widths: as given, or (for an architecture with them) d_sae/16, d_sae/4, d_sae — the
        ladder of Bussmann et al. 2025's smallest runs, 4x apart."""
        if self.matryoshka_widths is not None or not self.architecture_class.nested_prefixes:
            return self.matryoshka_widths
        return tuple(sorted({max(1, self.d_sae // 16), max(1, self.d_sae // 4), self.d_sae}))

    def sae_config(self, d_in: int, input_scale: float, d_out: int | None = None, output_scale: float | None = None) -> SAEConfig:
        """The dictionary this run trains (and a checkpoint of it rebuilds); ``d_out`` and ``output_scale`` for a
        transcoder."""
        return SAEConfig.build(architecture=self.architecture, d_in=d_in, d_sae=self.d_sae, input_scale=input_scale,
                               k=self.resolved_k(), bandwidth=self.bandwidth, matryoshka_widths=self.resolved_widths(),
                               d_out=d_out, output_scale=output_scale)

    def resolved_k(self) -> int | None:
        if not self.architecture_class.takes_k:
            return None
        return self.k or (int(round(self.target_l0)) if self.target_l0 else 32)


def _names(predicate) -> str:
    """The registered architectures with a property, for a message: "topk", "topk or batchtopk", "a, b or c"."""
    names = architectures_where(predicate)
    if not names:
        return "no registered architecture"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    config: TrainConfig
    sparsity_coefficient: float
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    input_scale: float = 1.0
    dead_fraction: float = 0.0
    output_scale: float | None = None  # a transcoder's scale of its targets


def estimate_input_scale(sample: Tensor) -> float:
    """√d / E‖x‖: the SAELens ActivationScaler convention (Anthropic, Apr 2024 update); a transcoder's targets get
    their own."""
    mean_norm = sample.float().norm(dim=1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise MonosemanticError("activation data is all zeros or not finite; nothing to train on")
    return math.sqrt(sample.shape[1]) / mean_norm


class Trainer:
    """One SAE training run over an activation source. ``run()`` trains to the end (or from a checkpoint)."""

    def __init__(self, cfg: TrainConfig, source: ActivationSource, checkpoint_dir: Path | None = None) -> None:
        if cfg.batch_size > source.rows:
            raise ConfigError(f"batch_size ({cfg.batch_size}) exceeds the {source.rows} rows of activation data")
        if cfg.architecture_class.reads_pairs != source.paired:
            raise ConfigError(
                f"{cfg.architecture} reconstructs another hook's activation: train it on a paired harvest (harvest "
                "--hook-in HOOK --hook-out HOOK)" if cfg.architecture_class.reads_pairs else
                f"these activations are input-output pairs (a harvest at --hook-in and --hook-out): they train a "
                f"transcoder ({_names(lambda c: c.reads_pairs)}), not {cfg.architecture}")
        source.require_finite()
        self.cfg, self.source = cfg, source
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        torch.manual_seed(cfg.seed)
        sample, targets = source.split(source.sample(min(source.rows, 32_768), seed=cfg.seed))
        self.input_scale = estimate_input_scale(sample)
        self.output_scale = estimate_input_scale(targets) if targets is not None else None
        self.sae = build_sae(cfg.sae_config(source.d_in, self.input_scale, source.d_out if targets is not None else None,
                                            self.output_scale), seed=cfg.seed)
        self.arch = type(self.sae)  # what this architecture needs of the trainer (its class's declarations)
        reconstructed = (sample if targets is None else targets) * self.sae.output_scale  # normalised, as the loss sees it
        with torch.no_grad():
            # Bricken et al.: b_dec starts at the geometric median of the data (in normalised units here); a
            # transcoder's, of its targets.
            self.sae.b_dec.copy_(geometric_median(reconstructed[:8192]))
            if self.arch.calibrated_start:
                self._calibrate_encoder_bias(sample[:8192] * self.input_scale)
        self.variance = float(reconstructed.var(0, unbiased=False).sum())  # for the live FVU
        if not self.variance > 1e-12 * reconstructed.shape[1]:
            raise DataError(f"the activation data has no variance ({source.rows} rows, all alike): there is nothing "
                            "for a dictionary to learn")
        # The fused kernel does Adam's whole update in one pass per tensor: 11× faster than the foreach one on this
        # CPU (1.2 ms against 13.6 ms for 4M parameters), the same maths.
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=True)
        self.step = 0
        self.coefficient = cfg.sparsity_coefficient if cfg.sparsity_coefficient is not None else self.arch.default_sparsity_coefficient
        self.l0_ema: float | None = None  # L0 over the last ~10 steps
        self.l0_slow: float | None = None  # over the last ~100: the trend is fast against slow, not step against step
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
        self.history: list[dict] = []
        self.dead_window = cfg.dead_window_tokens or self._default_dead_window()
        self.resample_steps = sorted({int(f * cfg.steps) for f in cfg.resample_fractions if 0 < f < 1}) if self.arch.resamples_dead_features else []

    def _default_dead_window(self) -> int:
        # Gao et al. call a latent dead after 10M tokens unfired; a short run uses half the gap between
        # resamples (Bricken: 12,500 of the 25,000 steps between resamples), or a tenth of the run.
        tokens = self.cfg.tokens
        if self.cfg.architecture_class.resamples_dead_features and self.cfg.resample_fractions:
            return max(self.cfg.batch_size, int(min(self.cfg.resample_fractions) * tokens / 2))
        return max(self.cfg.batch_size, min(10_000_000, tokens // 10))

    # ---- schedules --------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        steps, cfg = self.cfg.steps, self.cfg
        warm = int(cfg.lr_warmup_fraction * steps)
        decay_start = int((1 - cfg.lr_decay_fraction) * steps)
        if warm and step < warm:
            return cfg.lr * (step + 1) / warm
        if step >= decay_start and cfg.lr_decay_fraction > 0:
            return cfg.lr * max(0.0, (steps - step) / max(1, steps - decay_start))
        return cfg.lr

    def initial_firing_rate(self) -> float:
        cfg = self.cfg
        if cfg.initial_firing_rate is not None:
            return cfg.initial_firing_rate
        wanted = cfg.target_l0 or cfg.resolved_k()  # a TopK-family architecture's L0 is its k
        return min(0.5, 2 * wanted / cfg.d_sae) if wanted else 0.01

    @torch.no_grad()
    def _calibrate_encoder_bias(self, x_normalised: Tensor, features: Tensor | None = None) -> None:
        """An architecture with a calibrated start (ReLU, JumpReLU): set b_enc so that each feature's pre-activation
        clears its firing threshold (0, or JumpReLU's θ) on `initial_firing_rate` of the sample (the data-dependent
        initialisation of Anthropic's January 2025 update).

        From a fixed b_enc = 0, half the latents fire at first, and L0 can only fall as fast as b_enc or the
        log-thresholds move, at Adam's pace: on the reference harvest L0 was still 1,027 of 4,096 after 4M tokens with a target of
        20. Calibrated, a run starts near its target, sparse, and takes the support step (3.6× the dense step's rate in bench/train_sae.py) from the start.
        """
        sae, rows = self.sae, x_normalised.shape[0]
        keep = max(1, math.ceil(self.initial_firing_rate() * rows))
        centred, threshold = x_normalised - sae.input_bias, sae.firing_threshold()
        features = torch.arange(sae.cfg.d_sae) if features is None else features  # `features`: only those (revived ones)
        for start in range(0, features.numel(), 4096):  # [rows, 4096] at a time: bounded memory for any d_sae
            columns = features[start:start + 4096]
            pre_bias = centred @ sae.W_enc[:, columns]
            # The keep-th largest value per feature: exactly `keep` rows lie at or above it.
            kth_largest = pre_bias.topk(keep, dim=0).values[-1]
            sae.b_enc[columns] = threshold[columns] - kth_largest + 1e-6

    def sparsity_warmup(self, step: int) -> float:
        warm = int(self.cfg.sparsity_warmup_fraction * self.cfg.steps)
        return min(1.0, (step + 1) / warm) if warm else 1.0

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self, batch: Tensor) -> dict:
        cfg, sae = self.cfg, self.sae
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        dead_mask = (self.tokens_since_fired >= self.dead_window) if self.arch.uses_dead_mask else None
        sparse = self.sparse_step()
        forward = sae.forward_sparse if sparse else sae.forward
        inputs, targets = self.source.split(batch)
        paired = {} if targets is None else {"target": targets}  # a transcoder's output rows
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = forward(inputs, dead_mask=dead_mask, **paired)
        coefficient = self.coefficient * self.sparsity_warmup(self.step)
        loss = out.mse + coefficient * out.sparsity + out.aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        gradient_norm = clip_gradients(list(sae.parameters()), cfg.grad_clip)
        # Stop before a non-finite step reaches the weights: the last checkpoint stays good, nothing is published.
        if not (math.isfinite(float(loss.detach())) and math.isfinite(gradient_norm)):
            raise TrainingDiverged(f"training diverged at step {self.step + 1}: the loss or its gradient is not finite "
                                   f"(loss {float(loss.detach()):.3g}); lower --lr, or check the data")
        self.optimizer.step()
        sae.normalize_decoder()

        self.tokens_since_fired += batch.shape[0]
        self.tokens_since_fired[out.fired] = 0
        l0 = float(out.l0)
        self.l0_ema = l0 if self.l0_ema is None else 0.9 * self.l0_ema + 0.1 * l0
        self.l0_slow = l0 if self.l0_slow is None else 0.99 * self.l0_slow + 0.01 * l0
        self._steer_coefficient(self.l0_ema, self.l0_slow)
        self.step += 1
        if self.step in self.resample_steps:
            self.resample_dead_features()
        mse = float(out.mse.detach())
        if mse / self.variance > DIVERGED_FVU:
            raise TrainingDiverged(f"training diverged at step {self.step}: FVU {mse / self.variance:.3g} "
                                   f"(over {DIVERGED_FVU:g}); lower --lr (now {cfg.lr:g})")
        return {"step": self.step, "mse": mse, "fvu": mse / self.variance, "l0": l0,
                "aux": float(out.aux.detach()), "coefficient": self.coefficient, "lr": self.lr_at(self.step - 1),
                "sparse_step": sparse,
                "dead_fraction": float((self.tokens_since_fired >= self.dead_window).float().mean())}

    def sparse_step(self) -> bool:
        """Whether this step runs on the support only: gradients equal to rounding, and 3.4× faster at L0 11 of
        4,096 but slower past ~7% density (bench/train_sae.py), so it waits until the running L0 is low."""
        if self.cfg.sparse_step_density <= 0:
            return False
        if self.arch.takes_k:  # L0 is k from the start
            return self.sae.cfg.k <= self.cfg.sparse_step_density * self.cfg.d_sae
        return self.l0_ema is not None and self.l0_ema < self.cfg.sparse_step_density * self.cfg.d_sae

    def _steer_coefficient(self, l0: float, slow_l0: float) -> None:
        # Users think in L0, not λ: after the sparsity warm-up, move log λ by a small step proportional to
        # log(L0 / target). Multiplicative, so it works whatever scale λ lives on. Conditional integration
        # (no step while L0 is already moving towards the target) prevents wind-up: JumpReLU thresholds move
        # at Adam's pace whatever λ is, and an integrator that kept pushing would overshoot by orders of magnitude.
        # The trend compares the ~10-step mean with the ~100-step mean: step against step, L0's noise made the
        # trend's sign a coin toss, so λ kept integrating on half the steps (JumpReLU: λ ×60, then L0 at 40% of target).
        cfg = self.cfg
        if cfg.target_l0 is None or not self.arch.has_sparsity_coefficient or self.sparsity_warmup(self.step) < 1.0:
            return
        # While the learning rate anneals, λ's step shrinks with it, so λ settles as the weights do and the end point
        # is a fixed objective. Holding λ outright from the decay's start (as before) left L0 drifting down for the
        # last fifth of a short run: 4.05 for a target of 5, 7.05 for 8, against 4.25 and 7.30 steered (bench/quality.py).
        error = math.log(max(l0, 1e-3) / cfg.target_l0)
        trend = math.log(max(l0, 1e-3) / max(slow_l0, 1e-3))
        if error * trend < 0:
            return
        annealed = self.lr_at(self.step) / cfg.lr
        self.coefficient *= math.exp(cfg.controller_gain * annealed * max(-0.5, min(0.5, error)))

    # ---- Bricken et al. 2023, "Neuron Resampling" appendix -----------------------------------------
    @torch.no_grad()
    def resample_dead_features(self) -> int:
        sae, cfg = self.sae, self.cfg
        dead = (self.tokens_since_fired >= self.dead_window).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        inputs, targets = self.source.split(self.source.sample(min(self.source.rows, 64 * cfg.batch_size), seed=cfg.seed + self.step))
        wanted = inputs if targets is None else targets  # what the dictionary reconstructs: a transcoder's targets
        losses = []
        for x, y in zip(inputs.split(cfg.batch_size), wanted.split(cfg.batch_size)):
            losses.append(((y - sae.reconstruct(x)) * sae.output_scale).pow(2).sum(-1))
        weights = torch.cat(losses).pow(2)  # sampling probability ∝ squared loss
        if not bool(torch.isfinite(weights).all()):
            raise TrainingDiverged(f"training stopped at step {self.step}: reconstruction losses are not finite at the resample")
        if float(weights.sum()) <= 0:
            return 0
        picked = torch.multinomial(weights, dead.numel(), replacement=True, generator=generator)
        # The encoder sees x − b_dec, so that centred input is the direction a revived feature should detect; it writes
        # the centred target (for a dictionary the same vector; for a transcoder the output it was paired with).
        directions = inputs[picked] * self.input_scale - sae.input_bias
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        writes = wanted[picked] * sae.output_scale - sae.b_dec
        writes /= writes.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(cfg.d_sae, dtype=torch.bool)
        alive[dead] = False
        alive_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = writes
        sae.W_enc[:, dead] = (directions * 0.2 * alive_norm).t()
        sae.b_enc[dead] = 0.0
        own = sae.revive(dead)  # the architecture's own parameters (gated's magnitude path)
        if self.arch.calibrated_start:
            # Revived as they started: firing on the initial rate of a sample. With b_enc 0 a revived ReLU latent
            # fires on about half of all tokens: a ReLU transcoder's 170 revived latents took L0 from 8 to 341 at
            # each resample, the L0 controller read the spikes as L0 above target and wound λ from 5 to 19, and
            # the run ended at L0 3.5 for a target of 16 (bench/RESULTS.md).
            self._calibrate_encoder_bias(inputs[:8192] * self.input_scale, dead)
        for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,)), *own):
            state = self.optimizer.state.get(param, {})
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    state[moment][index] = 0.0
        self.tokens_since_fired[dead] = 0
        return int(dead.numel())

    # ---- checkpoints (one safetensors file; no pickle; trainer/checkpoint.py) ------------------------
    def save_checkpoint(self, last: dict | None = None) -> None:
        if self.checkpoint_dir is None:
            return
        params = dict(self.sae.named_parameters())
        for n, p in params.items():
            if not bool(torch.isfinite(p).all()):
                raise TrainingDiverged(f"training stopped at step {self.step}: weight {n} is not finite (not checkpointed)")
        tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
        for n, p in params.items():
            for moment, value in self.optimizer.state.get(p, {}).items():
                if moment != "step":
                    tensors[f"adam.{n}.{moment}"] = value.contiguous()
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors.update({f"state.{n}": value.detach().contiguous() for n, value in self.sae.running_state().items()})
        adam_steps = {n: float(self.optimizer.state[p]["step"]) for n, p in params.items() if p in self.optimizer.state}
        write_checkpoint(self.checkpoint_dir, Checkpoint(
            step=self.step, planned_steps=self.cfg.steps, coefficient=self.coefficient, l0_ema=self.l0_ema,
            l0_slow=self.l0_slow, input_scale=self.input_scale, output_scale=self.output_scale, variance=self.variance, adam_steps=adam_steps,
            config=self.cfg.model_dump(mode="json"), source=self.source.description, data=self.source.identity(),
            history=self.history, last=last or (self.history[-1] if self.history else {}),
        ), tensors)

    def load_checkpoint(self) -> bool:
        """Restore a previous run's exact state; False when there is none. Refused when the checkpoint was written
        with another config or on other data (its digest and shape), or is torn or truncated."""
        if self.checkpoint_dir is None or (found := read_checkpoint(self.checkpoint_dir)) is None:
            return False
        state, tensors = found
        if state.config != self.cfg.model_dump(mode="json"):
            raise ConfigError("--resume: the checkpoint was written with a different training config; "
                              "use the same options or a new --checkpoint-dir")
        if state.data != self.source.identity():
            raise ConfigError(f"--resume: the checkpoint was trained on other data ({state.data.get('rows')} rows of width "
                              f"{state.data.get('d_in')}, sha256 {str(state.data.get('sha256'))[:12]}…) than these "
                              f"({self.source.rows} rows of width {self.source.d_in}); resume on the same data or use a new --checkpoint-dir")
        params = dict(self.sae.named_parameters())
        for n, p in params.items():
            if tensors[f"param.{n}"].shape != p.shape:
                raise ConfigError(f"--resume: the checkpoint's {n} has shape {tuple(tensors[f'param.{n}'].shape)}, not {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        self.sae.load_running_state(running_state_of(tensors))
        for n, p in params.items():
            if n in state.adam_steps:
                self.optimizer.state[p] = {
                    "step": torch.tensor(state.adam_steps[n]),
                    "exp_avg": tensors[f"adam.{n}.exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].clone(),
                }
        self.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.step, self.coefficient, self.l0_ema, self.l0_slow = state.step, state.coefficient, state.l0_ema, state.l0_slow
        self.input_scale, self.variance, self.history = state.input_scale, state.variance, state.history
        self.output_scale = state.output_scale
        self.sae.cfg = self.sae.cfg.model_copy(update={"input_scale": self.input_scale, "output_scale": self.output_scale})
        return True

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
        if resume:
            self.load_checkpoint()
        cfg, started = self.cfg, time.perf_counter()
        batches = self.source.batches(cfg.batch_size, seed=cfg.seed, start_batch=self.step)
        bar = progress_bar(total=cfg.steps, initial=self.step, enabled=progress, unit="step", desc=f"train {cfg.architecture}")
        self.sae.train()
        last: dict = {}
        try:
            while self.step < cfg.steps:
                last = self.train_step(next(batches))
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.history.append(last)
                    bar.set_postfix(mse=f"{last['mse']:.3g}", fvu=f"{last['fvu']:.3f}", l0=f"{last['l0']:.1f}",
                                    dead=f"{last['dead_fraction']:.3f}", lam=f"{self.coefficient:.3g}")
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(last)
                if stop_after_steps is not None and self.step >= stop_after_steps:
                    break
        finally:
            bar.close()
        self.save_checkpoint(last)
        self.sae.eval()
        return TrainResult(
            sae=self.sae, config=cfg, sparsity_coefficient=self.coefficient, tokens=self.step * cfg.batch_size,
            seconds=time.perf_counter() - started, history=self.history, input_scale=self.input_scale,
            dead_fraction=last.get("dead_fraction", 0.0), output_scale=self.output_scale,
        )


def running_state_of(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's ``state.*`` tensors by buffer name (SparseAutoencoder.running_state)."""
    return {name.removeprefix("state."): value for name, value in tensors.items() if name.startswith("state.")}


def train_sae(cfg: TrainConfig, source: ActivationSource, checkpoint_dir: Path | None = None,
              resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a dictionary on ``source`` (the entry point of ``monosemantic-train train``)."""
    return Trainer(cfg, source, checkpoint_dir).run(resume=resume, progress=progress)
