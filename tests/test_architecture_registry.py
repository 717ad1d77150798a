"""A new SAE architecture is one registered class in monosemantic/sae.py: the trainer asks the class, never the name.

Each test registers a throwaway architecture defined here (and removes it afterwards, so other files' parametrisations
over SAE_REGISTRY never see it), then trains it through trainer.train's public API. A trainer that still compared
architecture names ("topk", "relu", …) would refuse these configs, miss the class's declarations, or fail outright.
"""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from monosemantic.artifact import HookRef, ModelRef, load_dictionary
from monosemantic.errors import ConfigError
from monosemantic.sae import SAE_REGISTRY, ReluSAE, SAEConfig, SparseAutoencoder, architecture_class, register
from monosemantic.support import Support
from trainer.activations import ActivationSource
from trainer.publish import publish_trained
from trainer.synthetic import make_sparse_data
from trainer.train import TrainConfig, Trainer, train_sae

BATCH_TOPK = "test-batchtopk"
QUIET_RELU = "test-quiet-relu"


class BatchTopKSAE(SparseAutoencoder):
    """Bussmann et al. 2024 (BatchTopK): keep the k·batch largest activations of the whole batch, so a token may
    use more or fewer than k latents. Like TopK it has a fixed k, no sparsity coefficient and an AuxK-style use of
    the dead mask (recorded here, to prove the trainer passes it)."""

    takes_k = True
    has_sparsity_coefficient = False
    uses_dead_mask = True

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        self.dead_masks_seen: list[torch.Tensor | None] = []

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        flat = F.relu(pre.reshape(-1, pre.shape[-1]))
        values, indices = flat.flatten().topk(min(flat.numel(), self.cfg.k * flat.shape[0]), sorted=False)
        return torch.zeros_like(flat).flatten().scatter_(0, indices, values).reshape(pre.shape)

    def forward(self, x, dead_mask=None):
        self.dead_masks_seen.append(dead_mask)
        return super().forward(x, dead_mask)

    def forward_sparse(self, x, dead_mask=None):
        self.dead_masks_seen.append(dead_mask)
        return super().forward_sparse(x, dead_mask)

    def support(self, pre: torch.Tensor) -> Support:
        return Support.from_mask(self.activate(pre))

    def activate_support(self, pre_values, support):
        return F.relu(pre_values)

    def support_sparsity(self, pre_values, values, support):
        return torch.zeros((), device=pre_values.device)


class QuietReluSAE(ReluSAE):
    """ReLU with another default λ and no resampling: the trainer must take both from the class, not the maths."""

    default_sparsity_coefficient = 2.5
    resamples_dead_features = False


@pytest.fixture
def registered():
    register(BATCH_TOPK)(BatchTopKSAE)
    register(QUIET_RELU)(QuietReluSAE)
    yield
    SAE_REGISTRY.pop(BATCH_TOPK)
    SAE_REGISTRY.pop(QUIET_RELU)


@pytest.fixture(scope="module")
def source():
    data = make_sparse_data(8192, d=16, n_features=32, mean_active=3.0, seed=0)
    return ActivationSource(parts=[data.activations.numpy()], dtype="float32")


def _config(**fields) -> TrainConfig:
    return TrainConfig.build(d_sae=64, tokens=20 * 256, batch_size=256, lr=3e-3, seed=0, bf16=False, **fields)


def test_a_registered_architecture_trains_and_publishes_without_trainer_edits(registered, source, tmp_path):
    cfg = _config(architecture=BATCH_TOPK, k=4, sparse_step_density=0.1)  # k ≤ 0.1·d_sae: the support step too
    assert cfg.architecture_class is BatchTopKSAE and cfg.resolved_k() == 4 and "k 4" in cfg.summary()

    result = train_sae(cfg, source, progress=False)

    assert isinstance(result.sae, BatchTopKSAE) and result.sae.cfg.k == 4
    assert result.tokens == 20 * 256 and len(result.sae.dead_masks_seen) == 20
    assert all(mask is not None and mask.shape == (64,) for mask in result.sae.dead_masks_seen)  # uses_dead_mask
    assert result.sparsity_coefficient == 0.0  # its class's default λ, never steered (no coefficient)
    assert result.history and all(entry["sparse_step"] for entry in result.history)
    # BatchTopK keeps k per token on average over a batch.
    assert torch.count_nonzero(result.sae.encode(torch.randn(256, 16))) == 4 * 256

    path = publish_trained(tmp_path, "batch", result.sae, config=cfg, sparsity_coefficient=result.sparsity_coefficient,
                           tokens=result.tokens, model=ModelRef(name="m", checksum=hashlib.sha256(b"m").hexdigest()),
                           hook=HookRef(name="h", module_path="h"), metrics={"fvu": 0.5})
    loaded = load_dictionary(tmp_path, "batch")
    assert loaded.path == path and isinstance(loaded.sae, BatchTopKSAE)
    assert loaded.manifest.architecture == BATCH_TOPK and loaded.manifest.sparsity_coefficient is None


def test_the_trainer_takes_each_declaration_from_the_class(registered, source):
    trainer = Trainer(_config(architecture=QUIET_RELU, target_l0=4), source)
    assert trainer.coefficient == 2.5  # default_sparsity_coefficient
    assert trainer.resample_steps == []  # resamples_dead_features = False, though its maths is ReLU's
    before = trainer.coefficient
    for _ in range(12):
        trainer.train_step(next(trainer.source.batches(256, seed=0)))
    assert trainer.coefficient != before  # has_sparsity_coefficient: the L0 controller steers it

    relu = Trainer(_config(architecture="relu", target_l0=4), source)
    assert relu.coefficient == 5.0 and relu.resample_steps  # the registered ReLU is unchanged


def test_options_are_checked_against_the_class_and_messages_name_the_registered_architectures(registered):
    with pytest.raises(ConfigError, match=f"k applies to topk, batchtopk, matryoshka, transcoder, skip-transcoder or {BATCH_TOPK} only, not relu"):
        _config(architecture="relu", k=4)
    with pytest.raises(ConfigError, match=f"{BATCH_TOPK} has no sparsity coefficient"):
        _config(architecture=BATCH_TOPK, k=4, sparsity_coefficient=1.0)
    with pytest.raises(ConfigError, match=f"{BATCH_TOPK} takes k or target_l0"):
        _config(architecture=BATCH_TOPK, k=4, target_l0=4)
    with pytest.raises(ConfigError, match=f"initial_firing_rate applies to relu, jumprelu, batchtopk, matryoshka, relu-transcoder, relu-skip-transcoder, jumprelu-transcoder, "
                                          f"jumprelu-skip-transcoder or {QUIET_RELU} only, not {BATCH_TOPK}"):
        _config(architecture=BATCH_TOPK, k=4, initial_firing_rate=0.1)
    with pytest.raises(ConfigError, match=f"k is required for the {BATCH_TOPK} architecture"):
        SAEConfig.build(architecture=BATCH_TOPK, d_in=4, d_sae=8)
    assert _config(architecture=BATCH_TOPK).resolved_k() == 32  # target_l0 or 32, as for TopK


def test_an_unregistered_name_is_refused_listing_the_registered_ones(registered):
    with pytest.raises(ConfigError, match=f"architecture: Input should be 'relu', 'topk', 'jumprelu', 'batchtopk', 'gated', 'matryoshka', 'transcoder', 'skip-transcoder', 'relu-transcoder', "
                                          f"'relu-skip-transcoder', 'jumprelu-transcoder', 'jumprelu-skip-transcoder', '{BATCH_TOPK}' or "
                                          f"'{QUIET_RELU}' \\(got 'quantum'\\)"):
        _config(architecture="quantum")
    with pytest.raises(ConfigError, match="unknown architecture 'quantum'; known: batchtopk, gated, jumprelu, jumprelu-skip-transcoder, jumprelu-transcoder, matryoshka, relu, relu-skip-transcoder, relu-transcoder, skip-transcoder, test-batchtopk"):
        architecture_class("quantum")
    assert TrainConfig.model_json_schema()["properties"]["architecture"]["enum"] == list(SAE_REGISTRY)


def test_the_shipped_architectures_declare_what_the_trainer_did_by_name():
    """The declarations equal the trainer's former name tests (DEFAULT_SPARSITY, == "topk", == "relu", …)."""
    table = {name: (cls.default_sparsity_coefficient, cls.takes_k, cls.has_sparsity_coefficient,
                    cls.resamples_dead_features, cls.uses_dead_mask, cls.learned_threshold)
             for name, cls in SAE_REGISTRY.items()}
    assert table == {
        "relu": (5.0, False, True, True, False, False),
        "topk": (0.0, True, False, False, True, False),
        "jumprelu": (1.0, False, True, False, False, True),
        "batchtopk": (0.0, True, False, False, True, False),
        "matryoshka": (0.0, True, False, False, True, False),
        "gated": (5.0, False, True, True, False, False),
        "transcoder": (0.0, True, False, False, True, False),
        "skip-transcoder": (0.0, True, False, False, True, False),
        "relu-transcoder": (5.0, False, True, True, False, False),
        "relu-skip-transcoder": (5.0, False, True, True, False, False),
        "jumprelu-transcoder": (1.0, False, True, False, False, True),
        "jumprelu-skip-transcoder": (1.0, False, True, False, False, True),
    }
