"""Peer SAE training steps timed on the bench's data: SAELens (standard ReLU/L1, JumpReLU, BatchTopK, Matryoshka BatchTopK and gated, through
its own SAETrainer) and sparsify (TopK SparseCoder, autoencoding or transcoding, one step of its Trainer mirrored line
for line).

Both packages are optional (the `bench` extra). Nothing here imports them at module import time, so
bench/train_sae.py keeps working in an environment without them; `installed()` says which are present.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from trainer.activations import ActivationSource

WARMUP_STEPS = 3  # the same warm-up as our own rows in train_sae.py, so the timed windows are comparable

PACKAGES = {"SAELens": ("sae_lens", "sae-lens"), "sparsify": ("sparsify", "eai-sparsify")}  # name: (module, dist)


@dataclass(frozen=True)
class PeerRow:
    """One timed peer configuration."""

    package: str  # "SAELens" or "sparsify"
    ours: str  # our architecture it is compared with: "relu", "jumprelu", "batchtopk" or "topk"
    label: str  # the peer's own name for the step and its settings
    autocast: bool  # bf16 autocast around the forward (the peer's fp32 master weights either way)
    tokens_per_s: float


def installed() -> dict[str, str | None]:
    """Package name → installed version, or None when its module cannot be found."""
    out: dict[str, str | None] = {}
    for name, (module, dist) in PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            out[name] = None
            continue
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown version"
    return out


def _rate(step: Callable[[Tensor], object], batches: Iterator[Tensor], steps: int) -> float:
    """Tokens/s over `steps` steps after WARMUP_STEPS, fetching each batch inside the timed loop as ours() does."""
    for _ in range(WARMUP_STEPS):
        step(next(batches))
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        tokens += batch.shape[0]
    return tokens / (time.perf_counter() - start)


# ---- SAELens ------------------------------------------------------------------------------------------
def saelens_rate(arch: Literal["standard", "jumprelu", "batchtopk", "matryoshka", "gated"], source: ActivationSource, d_sae: int, batch: int,
                 steps: int, autocast: bool, k: int = 32) -> float:
    """SAELens' own training step, through its SAETrainer, at its fastest CPU settings.

    Each timed step is the body of `SAETrainer.fit()`'s loop minus wandb logging and the progress bar:
    `maybe_reset_sparsity()`, `step(batch)` (device move, ActivationScaler, then `_train_step`: the SAE's
    `training_forward_pass` under the trainer's `torch.autocast("cpu", bfloat16)` when `autocast=True`, the
    firing statistics, `loss.backward()`, `clip_grad_norm_(1.0)`, Adam step, `zero_grad`, LR and coefficient
    schedulers), `_checkpoint_if_needed()` (no checkpoints configured) and the step counter.
    SAELens has no decoder-renormalisation step: the standard SAE weights its L1 by ‖W_dec‖ instead, and the
    JumpReLU SAE projects its threshold to ≥ 0 inside training_forward_pass.
    """
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedTrainingSAE, GatedTrainingSAEConfig,
                          JumpReLUTrainingSAE,
                          JumpReLUTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,
                          MatryoshkaBatchTopKTrainingSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig)
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    # fp32 weights (autocast, when on, only lowers the matmuls); "expected_average_only_in" is SAELens' E‖x‖ = √d_in
    # scaling, the same normalisation our trainer applies, so the sparsity coefficients mean the same thing.
    common = {"d_in": source.d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
              "normalize_activations": "expected_average_only_in"}
    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=5.0))  # our relu λ start
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=k))  # AuxK on, as ours
    elif arch == "gated":
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(**common, l1_coefficient=5.0))  # our gated λ start, as standard's
    elif arch == "matryoshka":  # the prefixes our trainer defaults to: d_sae/16, d_sae/4, d_sae
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, k=k, matryoshka_widths=[d_sae // 16, d_sae // 4, d_sae]))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common))  # DeepMind "step" L0 loss, the default
    lr = 3e-4  # LanguageModelSAERunnerConfig's default; lr_end = lr / 10 as that config's __post_init__ sets it
    cfg = SAETrainerConfig(
        total_training_samples=(WARMUP_STEPS + steps) * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr / 10,
        lr_scheduler_name="constant", device="cpu", autocast=autocast,
        logger=LoggingConfig(log_to_wandb=False),  # no wandb: logging is not part of the step being compared
    )
    batches = source.batches(batch, seed=0)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    # fit() estimates the scaling factor before its loop (from 1000 batches by default); 4 is plenty for the
    # bench's 64k rows. A separate iterator keeps the timed steps on the very batches our rows train on, and the
    # tqdm bar (leave=False) would only litter the bench's output, so it goes nowhere.
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.activation_scaler.estimate_scaling_factor(d_in=source.d_in, data_provider=source.batches(batch, seed=1),
                                                          n_batches_for_norm_estimate=4)

    def step(x: Tensor) -> None:
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1

    return _rate(step, batches, steps)


# ---- sparsify -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _float32_matmul_precision(precision: str) -> Iterator[None]:
    """sparsify's Trainer.fit() sets this process-wide; restore it so the rows measured later are unaffected."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def sparsify_decoder() -> str:
    """Which sparse decoder sparsify picked at import: Triton's embedding_bag, or torch's as the fallback."""
    with contextlib.redirect_stdout(io.StringIO()):  # sparsify.utils prints its choice on import
        from sparsify import utils
    return "triton embedding_bag" if utils.decoder_impl is utils.triton_decode else "eager embedding_bag"


class SparsifyRun(NamedTuple):
    """sparsify's training step on one (input, target) batch, its SparseCoder, and ``finish`` (the schedule-free
    optimizer's averaged weights swapped in, as sparsify's Trainer does before it saves)."""

    step: Callable[[Tensor, Tensor], None]
    sae: object  # sparsify.SparseCoder
    finish: Callable[[], None]


def sparsify_run(d_in: int, d_sae: int, k: int, total_steps: int, autocast: bool, optimizer: Literal["signum", "adam"],
                 transcode: bool = False, skip: bool = False) -> SparsifyRun:
    """One sparsify training step, mirroring sparsify/trainer.py (Trainer.__init__ and fit()) for loss_fn="fvu",
    one hookpoint, one seed, grad_acc_steps = micro_acc_steps = 1; autoencoding, or with ``transcode`` (and ``skip``,
    its skip_connection) transcoding, the step then taking the hookpoint's input and output rows.

    sparsify's Trainer only runs on a language model through forward hooks, so its step cannot be called on
    activation rows directly; the LM plumbing (hooks, input_ids masks, the copy of the hooked output) is left
    out, and everything the hook and the loop do to the SAE is kept, in their order.

    sparsify wraps SparseCoder.forward in bf16 autocast only on CUDA (`enabled=torch.cuda.is_bf16_supported()`),
    so on CPU its own step is fp32; `autocast=True` wraps the same forward in `torch.autocast("cpu", bfloat16)`,
    the scope its CUDA decorator has. ``total_steps`` is the length of its LR schedule (len(dataset) // batch_size).
    """
    with contextlib.redirect_stdout(io.StringIO()):  # sparsify.utils prints its decoder choice on import
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.config import TrainConfig
        from sparsify.sign_sgd import SignSGD
        from transformers import get_linear_schedule_with_warmup

    # auxk_alpha is 0 by default in sparsify, which would skip the dead-latent bookkeeping altogether; 1/32 is the
    # paper's AuxK weight and the one our TopK trainer uses, so both steps carry the same dead_mask path.
    cfg = TrainConfig(SparseCoderConfig(k=k, num_latents=d_sae, transcode=transcode, skip_connection=skip),
                      optimizer=optimizer, auxk_alpha=1 / 32, log_to_wandb=False)
    torch.manual_seed(cfg.init_seeds[0])
    sae = SparseCoder(d_in, cfg.sae, "cpu", dtype=torch.float32)

    # ---- Trainer.__init__: the optimizer block, verbatim for one SAE ----
    lr_schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
    if optimizer == "adam":
        try:
            from bitsandbytes.optim import Adam8bit as Adam  # type: ignore[import-not-found]
        except ImportError:
            from torch.optim import Adam
        adam = Adam([{"params": sae.parameters(), "lr": cfg.lr or 2e-4 / (sae.num_latents / (2**14)) ** 0.5}])
        optimizers: list = [adam]
        lr_schedulers = [get_linear_schedule_with_warmup(adam, cfg.lr_warmup_steps, total_steps)]
    else:  # "signum", sparsify's default optimizer
        opt = ScheduleFreeWrapper(
            SignSGD([{"params": sae.parameters(), "lr": cfg.lr or 5e-3 / (sae.num_latents / (2**14)) ** 0.5}]),
            momentum=0.95)
        opt.train()
        optimizers = [opt]
    num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    global_step = 0
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step(x: Tensor, y: Tensor) -> None:
        nonlocal global_step
        # ---- the forward hook ----
        if global_step == 0:  # "ensure the preactivations are centered at initialization"
            if cfg.sae.transcode:
                sae.encoder.bias.data = -x.mean(0).to(sae.dtype) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0).to(sae.dtype)
        if sae.cfg.normalize_decoder and not cfg.sae.transcode:
            sae.set_decoder_norm_to_unit_norm()
        dead_mask = num_tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (y - y.mean(0)).pow(2).sum()
        with precision:
            out = sae(x=x, y=y, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        # The hook reads these metrics back every step (a synchronisation point), so the mirror does too.
        float(out.fvu.detach())
        if cfg.auxk_alpha > 0:
            float(out.auxk_loss.detach())
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(cfg.grad_acc_steps * cfg.micro_acc_steps).backward()
        # ---- the loop after the model forward ----
        if cfg.sae.normalize_decoder and not cfg.sae.transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        for optim in optimizers:
            optim.step()
            optim.zero_grad()
        for scheduler in lr_schedulers:
            scheduler.step()
        sae.cfg.k = cfg.sae.k  # get_current_k() with k_decay_steps = 0
        with torch.no_grad():
            num_tokens_since_fired.add_(x.shape[0])
            num_tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        global_step += 1

    def finish() -> None:
        for optim in optimizers:
            if isinstance(optim, ScheduleFreeWrapper):
                optim.eval()

    return SparsifyRun(step, sae, finish)


def sparsify_rate(source: ActivationSource, d_sae: int, k: int, batch: int, steps: int, autocast: bool,
                  optimizer: Literal["signum", "adam"], skip: bool = False) -> float:
    """Tokens/s of sparsify's step on ``source``'s rows: autoencoding them, or on a paired source transcoding."""
    run = sparsify_run(source.d_in, d_sae, k, WARMUP_STEPS + steps, autocast, optimizer, transcode=source.paired, skip=skip)

    def step(rows: Tensor) -> None:
        x, y = source.split(rows)
        run.step(x, x if y is None else y)

    with _float32_matmul_precision("high"):  # as fit() sets it ("high" is TF32, a no-op on CPUs without it)
        return _rate(step, source.batches(batch, seed=0), steps)


# ---- all rows -----------------------------------------------------------------------------------------
def measure(source: ActivationSource, d_sae: int, batch: int, steps: int, k: int,
            archs: set[str] = frozenset({"relu", "jumprelu", "topk", "batchtopk", "matryoshka", "gated"})) -> tuple[list[PeerRow], list[str]]:
    """Every peer row available here for our architectures `archs`, and one line per package or row that could not
    be measured."""
    rows: list[PeerRow] = []
    notes: list[str] = []
    versions = installed()

    def attempt(package: str, ours: str, label: str, autocast: bool, run: Callable[[], float]) -> None:
        # A peer whose API changed under us should cost its row, not the whole benchmark run.
        try:
            rows.append(PeerRow(package, ours, label, autocast, run()))
        except Exception as exc:  # noqa: BLE001 - reported below, with the exception's type and message
            notes.append(f"{package} {label} ({'bf16-autocast' if autocast else 'fp32'}) failed: "
                         f"{type(exc).__name__}: {exc}")

    if not archs & {"relu", "jumprelu", "batchtopk", "matryoshka", "gated"}:
        pass
    elif versions["SAELens"] is None:
        notes.append("SAELens not installed (pip install -e '.[bench]'): its steps are not measured")
    else:
        for arch, ours in (("standard", "relu"), ("jumprelu", "jumprelu"), ("batchtopk", "batchtopk"),
                           ("matryoshka", "matryoshka"), ("gated", "gated")):
            if ours not in archs:
                continue
            for autocast in (False, True):
                attempt("SAELens", ours, f"{versions['SAELens']} {arch}" + (f" k={k}" if arch in ("batchtopk", "matryoshka") else ""), autocast,
                        lambda: saelens_rate(arch, source, d_sae, batch, steps, autocast, k))
    if "topk" not in archs:
        pass
    elif versions["sparsify"] is None:
        notes.append("sparsify not installed (pip install -e '.[bench]'): its step is not measured")
    else:
        try:
            decoder = sparsify_decoder()
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
            notes.append(f"sparsify does not import: {type(exc).__name__}: {exc}")
        else:
            for optimizer in ("signum", "adam"):
                for autocast in (False, True):
                    attempt("sparsify", "topk", f"{versions['sparsify']} topk k={k} {decoder} {optimizer}", autocast,
                            lambda: sparsify_rate(source, d_sae, k, batch, steps, autocast, optimizer))
    return rows, notes
