"""Benchmark: the dictionary each trainer makes of the same activations, ours against SAELens's own training, at the
same mean L0 and the same budget of rows.

    python bench/saelens_quality.py --harvest runs/harvest [--tokens 2000000] [--archs topk,batchtopk,matryoshka]
    python bench/saelens_quality.py --harvest runs/harvest --archs relu,jumprelu,gated [--coefficient 1.0]

The TopK family shares k (so the mean L0). ReLU, JumpReLU and gated have no k: SAELens trains first at its
coefficient (``--coefficient``, its default 1.0: ``l1_coefficient``, JumpReLU's ``l0_coefficient``), and ours is then
steered to SAELens's served L0 (``target_l0``), so the two FVUs are read at (about) one L0.

For each architecture both sides train on the same rows in the same order (batch 4,096, d_sae 4,096, k 24), each
at its own defaults (ours: trainer/train.py's; SAELens: ``SAETrainer.fit()`` at LanguageModelSAERunnerConfig's lr
3e-4, its activation scaling folded into the weights when fit ends). SAELens's trained SAE is then saved as its
inference model and loaded back (``save_inference_model``, ``SAE.load_from_disk``): BatchTopK and Matryoshka become
the JumpReLU at their learned threshold, as ours are served. Both are scored on the same held-out rows: FVU and the
served mean L0. Prints a table; nothing here is a pass/fail bound.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from trainer.activations import ActivationSource, open_harvest
from trainer.train import TrainConfig, Trainer

HELD_OUT, BATCH, D_SAE, K = 16_384, 4096, 4096, 24
SAELENS_CLASSES = {"topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig"),
                   "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
                   "matryoshka": ("MatryoshkaBatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAEConfig"),
                   "relu": ("StandardTrainingSAE", "StandardTrainingSAEConfig"),
                   "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
                   "gated": ("GatedTrainingSAE", "GatedTrainingSAEConfig")}
COEFFICIENT_FIELD = {"relu": "l1_coefficient", "jumprelu": "l0_coefficient", "gated": "l1_coefficient"}  # SAELens's names


def score(encode, decode, held: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        features = encode(held)
        fvu = float((decode(features) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
        return fvu, float((features != 0).sum(-1).float().mean())


def ours(arch: str, source: ActivationSource, tokens: int, held: torch.Tensor, l0: float | None = None) -> tuple[float, float, float]:
    """Ours at k, or (an architecture without one) steered to the mean L0 ``l0``."""
    started = time.perf_counter()
    sparsity = {"k": K} if arch not in COEFFICIENT_FIELD else {"target_l0": l0}
    sae = Trainer(TrainConfig.build(architecture=arch, d_sae=D_SAE, tokens=tokens, batch_size=BATCH, seed=0, **sparsity),
                  source).run(progress=False).sae
    seconds = time.perf_counter() - started
    return (*score(sae.encode, sae.decode, held), seconds)


def saelens(arch: str, source: ActivationSource, tokens: int, held: torch.Tensor, coefficient: float = 1.0) -> tuple[float, float, float]:
    import sae_lens
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae_cls, cfg_cls = (getattr(sae_lens, name) for name in SAELENS_CLASSES[arch])
    options = {"matryoshka_widths": [D_SAE // 16, D_SAE // 4, D_SAE]} if arch == "matryoshka" else {}
    options.update({COEFFICIENT_FIELD[arch]: coefficient} if arch in COEFFICIENT_FIELD else {"k": K})
    sae = sae_cls(cfg_cls(d_in=source.d_in, d_sae=D_SAE, dtype="float32", device="cpu",
                          normalize_activations="expected_average_only_in", **options))
    lr = 3e-4
    cfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=BATCH, lr=lr, lr_end=lr / 10,
                           lr_scheduler_name="constant", device="cpu", autocast=True,
                           logger=LoggingConfig(log_to_wandb=False), save_final_checkpoint=False)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=source.batches(BATCH, seed=0))
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        trained = trainer.fit()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(Path(tmp))
        served = SAE.load_from_disk(Path(tmp))
    return (*score(served.encode, served.decode, held), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--harvest", type=Path, required=True, help="a `monosemantic-train harvest` directory")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training rows per run")
    parser.add_argument("--rows", type=int, default=400_000, help="distinct rows read from the harvest (cycled)")
    parser.add_argument("--archs", default="topk,batchtopk,matryoshka")
    parser.add_argument("--coefficient", type=float, default=1.0, help="SAELens's sparsity coefficient for relu, jumprelu, gated")
    args = parser.parse_args()
    rows = open_harvest(args.harvest).sample(args.rows + HELD_OUT, seed=0)
    held = rows[-HELD_OUT:]
    source = ActivationSource(parts=[rows[:-HELD_OUT].numpy()], dtype="float32")
    print(f"{args.harvest}: {args.rows:,} rows of width {source.d_in}, {args.tokens:,} training rows per run "
          f"({args.tokens // BATCH} steps of {BATCH}), d_sae {D_SAE}, k {K}; scored on {HELD_OUT:,} held-out rows")
    print("| architecture | trainer | held-out FVU | served L0 | train s |")
    print("| --- | --- | --- | --- | --- |")
    peer = f"SAELens {__import__('sae_lens').__version__}"
    for arch in args.archs.split(","):
        theirs = saelens(arch, source, args.tokens, held, args.coefficient)
        mine = ours(arch, source, args.tokens, held, l0=theirs[1])  # at SAELens's L0 where there is no k
        how = f" ({COEFFICIENT_FIELD[arch]} {args.coefficient:g})" if arch in COEFFICIENT_FIELD else ""
        for name, (fvu, l0, seconds) in (("monosemantic", mine), (peer + how, theirs)):
            print(f"| {arch} | {name} | {fvu:.4f} | {l0:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
