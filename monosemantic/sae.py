"""Sparse autoencoder architectures (ReLU+L1, TopK, JumpReLU here; BatchTopK, Matryoshka and gated in their own
modules) in a name → class registry.

An architecture is one ``@register``-ed subclass of ``SparseAutoencoder``: besides its maths it declares, as class
attributes, how the trainer treats it (its default sparsity coefficient, whether it takes a fixed k, whether it has a
sparsity coefficient for the L0 controller to steer, dead-feature resampling or AuxK, a learned threshold). The
trainer reads those through ``architecture_class(name)`` and never compares names, so a new architecture is one new
class here.

Every architecture shares one layout, named and oriented as SAELens does so dictionaries move between
tools without transposes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (plus ``threshold [d_sae]`` for JumpReLU).

Callers always pass raw activations. Inside, inputs are multiplied by ``input_scale`` (chosen by the trainer
so that E‖x‖ = √d_in, as SAELens' ActivationScaler and Anthropic's April-2024 update do) and decoded outputs
divided by it, so the sparsity coefficients mean the same thing whatever the activation scale of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from monosemantic.block_topk import topk_indices
from monosemantic.errors import ConfigError, describe_validation_error
from monosemantic.support import DenseEncoder, Support, decode_support, support_pre_activations

SAE_REGISTRY: dict[str, type["SparseAutoencoder"]] = {}


def register(name: str) -> Callable[[type["SparseAutoencoder"]], type["SparseAutoencoder"]]:
    """Class decorator: make the class the architecture called ``name`` (in configs, manifests and the CLI)."""
    def wrap(cls: type["SparseAutoencoder"]) -> type["SparseAutoencoder"]:
        cls.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return wrap


def architecture_class(name: str) -> type["SparseAutoencoder"]:
    """The registered class for an architecture name; a ConfigError listing the known names otherwise."""
    try:
        return SAE_REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(SAE_REGISTRY))}") from None


def architectures_where(predicate: Callable[[type["SparseAutoencoder"]], bool]) -> list[str]:
    """Registered names (in registration order) whose class satisfies ``predicate``: for messages such as
    "k applies to topk only"."""
    return [name for name, cls in SAE_REGISTRY.items() if predicate(cls)]


def _known_architecture(name: str) -> str:
    if name not in SAE_REGISTRY:
        # Worded as pydantic words a Literal's error: "Input should be 'relu', 'topk' or 'jumprelu'".
        quoted = [repr(n) for n in SAE_REGISTRY]
        raise ValueError("Input should be " + (f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)))
    return name


def nested_widths_problem(widths: tuple[int, ...] | None, d_sae: int, arch: type["SparseAutoencoder"]) -> str | None:
    """What is wrong with ``matryoshka_widths`` for this architecture and d_sae, or None."""
    if not arch.nested_prefixes:
        return None if widths is None else (
            f"matryoshka_widths applies to {' or '.join(architectures_where(lambda c: c.nested_prefixes))} only, "
            f"not {arch.architecture}")
    if widths is None:
        return f"matryoshka_widths is required for the {arch.architecture} architecture"
    if not widths or any(w <= 0 for w in widths) or any(b <= a for a, b in zip(widths, widths[1:])):
        return f"matryoshka_widths {list(widths)} must be positive and increasing"
    if widths[-1] != d_sae:
        return f"matryoshka_widths must end at d_sae ({d_sae}), not {widths[-1]}"
    return None


class _RegisteredNames:
    """JSON schema of an architecture name: an enum of the names registered when the schema is generated."""

    def __get_pydantic_json_schema__(self, core_schema, handler):  # noqa: ANN001 (pydantic's hook)
        schema = handler(core_schema)
        schema["enum"] = list(SAE_REGISTRY)
        return schema


# An architecture name as configs hold it: any registered name, checked against the registry when validated (a
# Literal would freeze the names at import time, before an architecture registered later exists).
Architecture = Annotated[str, AfterValidator(_known_architecture), _RegisteredNames()]


class SAEConfig(BaseModel):
    """The shape and inference-time parameters of a dictionary (everything needed to rebuild it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture
    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    input_scale: float = Field(default=1.0, gt=0, description="raw activations are multiplied by this")
    k: int | None = Field(default=None, gt=0, description="TopK: active latents per token")
    k_aux: int | None = Field(default=None, gt=0, description="TopK: dead latents used by the AuxK loss")
    bandwidth: float = Field(default=0.05, gt=0, description="JumpReLU: rectangle-kernel width of the STE")
    matryoshka_widths: tuple[int, ...] | None = Field(
        default=None, description="Matryoshka: the nested prefixes' widths, increasing, the last d_sae")
    d_out: int | None = Field(default=None, gt=0, description="transcoders: the width of the activation reconstructed "
                                                               "(the output hook's); None: d_in")
    output_scale: float | None = Field(default=None, gt=0, description="transcoders: raw targets are multiplied by "
                                                                       "this; None: input_scale")

    @model_validator(mode="after")
    def _check_architecture_fields(self) -> "SAEConfig":
        arch = SAE_REGISTRY[self.architecture]
        if arch.takes_k:
            if self.k is None:
                raise ValueError(f"k is required for the {self.architecture} architecture")
            if self.k > self.d_sae:
                raise ValueError(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        problem = nested_widths_problem(self.matryoshka_widths, self.d_sae, arch)
        if problem:
            raise ValueError(problem)
        if not arch.reads_pairs:
            if self.d_out not in (None, self.d_in):
                raise ValueError(f"d_out ({self.d_out}) differs from d_in ({self.d_in}): only a transcoder "
                                 f"({' or '.join(architectures_where(lambda c: c.reads_pairs))}) reconstructs another width")
            if self.output_scale not in (None, self.input_scale):
                raise ValueError("output_scale applies to transcoders only (a dictionary reconstructs its own input)")
        return self

    @classmethod
    def build(cls, **fields: object) -> "SAEConfig":
        """Validate at the edge: a bad field becomes a ConfigError naming it."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "SAE config")) from None


@dataclass
class SAEOutput:
    """One forward pass: the reconstruction, the codes and the loss terms (in normalised units)."""

    x_hat: Tensor  # raw units, like the input
    features: Tensor  # [batch, d_sae] feature activations (a sparse COO tensor from forward_sparse)
    mse: Tensor  # mean over the batch of ‖x − x̂‖² summed over dimensions (normalised space)
    sparsity: Tensor  # the architecture's sparsity penalty before its coefficient (L1 or L0)
    aux: Tensor  # auxiliary loss already weighted (AuxK for TopK); 0 for others
    l0: Tensor  # mean active features per token (no gradient)
    fired: Tensor  # bool [d_sae]: features active on at least one token of the batch


def encoder_matmul(centred: Tensor, W_enc: Tensor, b_enc: Tensor, out: Tensor | None = None) -> Tensor:
    """Pre-activations W_enc(x − b_dec) + b_enc of centred rows [n, d_in] (Bricken et al. 2023: the pre-encoder bias
    is minus the decoder bias, tied, f = σ(W_enc(x − b_dec) + b_enc)), the one place every encoder multiplies.
    addmm keeps the bias add inside the (autocast bf16) matmul: a separate "+ b_enc" would promote the [batch, d_sae]
    result to fp32 and cost two extra full passes over it (measured: ~30% of a training step)."""
    return torch.addmm(b_enc, centred, W_enc, out=out)


class SparseAutoencoder(nn.Module):
    """Shared layout and maths; subclasses define the activation and the sparsity penalty, and declare below how
    the trainer treats them (trainer/train.py reads these, never the name)."""

    architecture: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    """The tensors an artifact stores, by attribute name: ``tensors()``, ``load_tensors()`` and ``expected_shapes()``
    read this; an architecture adds its own per-feature ones (JumpReLU's threshold, gated's r_mag and b_mag)."""

    # ---- what the trainer does with this architecture ---------------------------------------------
    default_sparsity_coefficient: ClassVar[float] = 0.0
    """λ a run starts from when none is given, in the normalised units above (E‖x‖ = √d_in, summed MSE)."""
    takes_k: ClassVar[bool] = False
    """Its sparsity is a fixed number k of active latents per token (``SAEConfig.k`` required; the training
    option ``k``, or ``target_l0`` used as k); other architectures refuse ``k``."""
    has_sparsity_coefficient: ClassVar[bool] = True
    """Its loss has a sparsity penalty weighted by a coefficient λ (``sparsity_penalty``), which the sparsity
    warm-up ramps and the target-L0 controller steers. Without one the training option ``sparsity_coefficient``
    is refused, the controller stands still and the manifest records no coefficient."""
    resamples_dead_features: ClassVar[bool] = False
    """Dead latents are re-initialised during training (Bricken et al. 2023's resampling, at the trainer's
    ``resample_fractions``), and the dead window defaults to half the gap before the first resample."""
    uses_dead_mask: ClassVar[bool] = False
    """The forward pass takes the trainer's mask of dead latents (``dead_mask``), for an auxiliary loss on them
    (AuxK for TopK); others are passed None."""
    learned_threshold: ClassVar[bool] = False
    """It has a per-latent learned ``threshold`` [d_sae] (what ``firing_threshold`` returns)."""
    calibrated_start: ClassVar[bool] = False
    """The trainer starts b_enc so that each latent's pre-activation clears its ``firing_threshold`` on
    ``initial_firing_rate`` of a data sample (an option the others refuse), so a run starts near its target L0."""
    nested_prefixes: ClassVar[bool] = False
    """Its loss also reconstructs from nested prefixes of the dictionary (Matryoshka): ``matryoshka_widths``
    required in its config and refused in others'."""
    reads_pairs: ClassVar[bool] = False
    """A transcoder: it reads one activation and reconstructs another (``d_out`` wide, from ``output_scale``), trained
    on paired rows (a harvest at ``--hook-in`` and ``--hook-out``); ``forward`` then takes the ``target``. Its encoder
    subtracts no decoder bias (``input_bias`` is zero: b_dec lives in the output's space)."""
    exports_as: ClassVar[str | None] = None
    """The registered architecture whose maths the trained dictionary's inference is, when not its own (BatchTopK
    serves as a JumpReLU): other tools' formats receive it under that name (monosemantic/interop/folding.py)."""

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # Decoder rows in random unit directions and the encoder as their transpose: Gao et al. 2024 §2.4 and
        # the Apr-2024 Anthropic update find this start keeps far more latents alive than Kaiming init.
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self._dense_encoder = DenseEncoder()  # the support step's buffers (empty until it first runs)

    # ---- the maths -------------------------------------------------------------------------------
    @property
    def input_bias(self) -> Tensor:
        """What the encoder subtracts from the normalised input: b_dec, tied (Bricken et al. 2023); a transcoder's
        zeros."""
        return self.b_dec

    @property
    def d_out(self) -> int:
        """The width of the reconstruction: d_in, or a transcoder's output width."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def output_scale(self) -> float:
        """Reconstructions are divided by this: input_scale, or a transcoder's own scale of its targets."""
        return self.cfg.output_scale or self.cfg.input_scale

    def skip(self, x_normalised: Tensor) -> Tensor | None:
        """A linear path from input to output added to the reconstruction (a skip transcoder's x W_skipᵀ, normalised
        units), or None."""
        return None

    def pre_activations(self, x_normalised: Tensor) -> Tensor:
        _, pre = self._centred_pre_activations(x_normalised.reshape(-1, self.cfg.d_in))
        return pre.reshape(*x_normalised.shape[:-1], self.cfg.d_sae)

    def activate_at(self, pre_at: Tensor, ids: Tensor) -> Tensor | None:
        """The features `ids` from their own pre-activations [..., len(ids)], where the activation acts on each
        feature alone; None where it needs every pre-activation (TopK's k-th largest)."""
        return None

    def pre_activations_at(self, x_normalised: Tensor, ids: Tensor) -> Tensor:
        """`pre_activations` of the features `ids` only [..., len(ids)]: their encoder columns, not all d_sae."""
        rows = x_normalised.reshape(-1, self.cfg.d_in) - self.input_bias
        pre = encoder_matmul(rows, self.W_enc[:, ids], self.b_enc[ids])
        return pre.reshape(*x_normalised.shape[:-1], ids.numel())

    def _centred_pre_activations(self, x_normalised: Tensor) -> tuple[Tensor, Tensor]:
        """(x − b_dec, W_enc(x − b_dec) + b_enc) for rows [n, d_in]."""
        centred = x_normalised - self.input_bias
        return centred, encoder_matmul(centred, self.W_enc, self.b_enc)

    def centre(self, x: Tensor) -> Tensor:
        """Raw activations → the encoder's input, x·input_scale − b_dec: what encoder_matmul multiplies (a serving
        encoder casts it to its own dtype in between, monosemantic/encoder.py)."""
        return x * self.cfg.input_scale - self.input_bias

    def activate(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def firing_threshold(self) -> Tensor:
        """The pre-activation above which each latent fires [d_sae]: 0 for a ReLU, JumpReLU's learned θ."""
        return torch.zeros(self.cfg.d_sae, device=self.b_enc.device)

    def activate_(self, pre: Tensor) -> Tensor:
        """`activate` for inference, free to write the result over `pre`: a server reading a batch of 2,048 tokens
        × 4,096 features then allocates (and page-faults in) one 16 MB matrix instead of two. Never under autograd."""
        return self.activate(pre)

    def sparsity_penalty(self, pre: Tensor, features: Tensor) -> Tensor:
        return torch.zeros((), device=pre.device)

    def pre_activation_for(self, values: Tensor, ids: Tensor) -> Tensor:
        """The pre-activations at which features ``ids`` would take ``values`` > 0 (steering's clamp aims there):
        the values themselves wherever a feature's activation passes its pre-activation through (ReLU, JumpReLU
        above its threshold, TopK when selected)."""
        return values

    def activate_with_sparsity(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(features, sparsity penalty) for a batch of pre-activations; one pass where an architecture can fuse them."""
        features = self.activate(pre)
        return features, self.sparsity_penalty(pre, features)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] → feature activations [..., d_sae]."""
        return self.activate(self.pre_activations(x * self.cfg.input_scale))

    def decode(self, features: Tensor) -> Tensor:
        """Feature activations [..., d_sae] → reconstruction in raw units [..., d_out] (without a skip path: see
        ``reconstruct``)."""
        return (features @ self.W_dec + self.b_dec) / self.output_scale

    def reconstruct(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """The dictionary's reconstruction of (a transcoder's: prediction from) raw activations x, in raw units:
        decode(encode(x)) plus the skip path where there is one. ``features``: encode(x), when already computed."""
        features = self.encode(x) if features is None else features
        return (features @ self.W_dec) / self.output_scale + self.offset(x)

    def offset(self, x: Tensor) -> Tensor:
        """What the dictionary writes for raw inputs x whatever its features, in raw units: b_dec, plus a skip
        transcoder's linear path (attribution's `rest`, the readout's sparse reconstruction add it to the features')."""
        skipped = self.skip(x * self.cfg.input_scale)
        return (self.b_dec if skipped is None else self.b_dec + skipped) / self.output_scale

    def with_skip(self, x_hat_n: Tensor, x_n: Tensor) -> Tensor:
        """A normalised reconstruction plus the skip path, where there is one."""
        skipped = self.skip(x_n)
        return x_hat_n if skipped is None else x_hat_n + skipped

    def target_of(self, x_n: Tensor, target: Tensor | None) -> Tensor:
        """What a forward reconstructs, normalised: the input itself, or a transcoder's paired target."""
        if target is None:
            if self.reads_pairs:
                raise ConfigError(f"a {self.architecture} reconstructs another activation: pass its target")
            return x_n
        return target * self.output_scale

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        x_n = x * self.cfg.input_scale
        y_n = self.target_of(x_n, target)
        pre = self.pre_activations(x_n)
        features, sparsity = self.activate_with_sparsity(pre)
        x_hat_n = self.with_skip(features @ self.W_dec + self.b_dec, x_n)
        mse = (x_hat_n.float() - y_n.float()).pow(2).sum(-1).mean()
        return SAEOutput(
            x_hat=x_hat_n / self.output_scale,
            features=features,
            mse=mse,
            sparsity=sparsity,
            aux=self.extra_loss_dense(pre, features, y_n.float()),
            l0=(torch.count_nonzero(features.detach()) / max(1, features.numel() // features.shape[-1])).float(),
            fired=(features.detach() > 0).reshape(-1, self.cfg.d_sae).any(0),
        )

    # ---- the same step over only the active latents (monosemantic/support.py) ---------------------
    def support(self, pre: Tensor) -> Support:
        """The (token, latent) pairs through which any gradient of the loss flows."""
        raise NotImplementedError

    def activate_support(self, pre_values: Tensor, support: Support) -> Tensor:
        raise NotImplementedError

    def support_sparsity(self, pre_values: Tensor, values: Tensor, support: Support) -> Tensor:
        raise NotImplementedError

    def activate_support_with_sparsity(self, pre_values: Tensor, support: Support) -> tuple[Tensor, Tensor]:
        values = self.activate_support(pre_values, support)
        return values, self.support_sparsity(pre_values, values, support)

    def aux_loss_sparse(self, pre: Tensor, centred: Tensor, error: Tensor, dead_mask: Tensor | None) -> Tensor:
        return torch.zeros((), device=pre.device)

    def extra_loss_dense(self, pre: Tensor, features: Tensor, x_n: Tensor) -> Tensor:
        """Further loss terms of ``forward`` (gated's reconstruction through its gate); 0 here. ``x_n``: the
        normalised target (the input itself but for a transcoder) in float32."""
        return torch.zeros((), device=pre.device)

    def extra_loss_support(self, pre_values: Tensor, values: Tensor, support: Support, x_n: Tensor) -> Tensor:
        """``extra_loss_dense`` over the support step's pre-activations and values (Matryoshka's nested
        reconstructions, gated's reconstruction through its gate); 0 here."""
        return torch.zeros((), device=values.device)

    def encode_support(self, x_n: Tensor) -> tuple[Tensor, Tensor, Support, Tensor]:
        """Dense pre-activations without autograd, the support, and its differentiable pre-activations."""
        with torch.no_grad():
            centred = x_n - self.input_bias
            device = centred.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.W_enc.dtype
            pre = self._dense_encoder(centred, self.W_enc, self.b_enc, dtype)
            support = self.support(pre)
        return pre, centred, support, support_pre_activations(pre, centred, support, self.W_enc, self.b_enc, self.input_bias)

    def forward_sparse(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """``forward`` for a training batch [batch, d_in], with the decoder and every backward matmul restricted to
        the support: the same loss and gradients (to rounding), far cheaper once L0 ≪ d_sae."""
        x_n = x.float() * self.cfg.input_scale
        y_n = self.target_of(x_n, None if target is None else target.float())
        pre, centred, support, pre_values = self.encode_support(x_n)
        values, sparsity = self.activate_support_with_sparsity(pre_values, support)
        x_hat_n = self.with_skip(decode_support(values, support, self.W_dec) + self.b_dec, x_n)
        error = y_n - x_hat_n.float()
        batch = x.shape[0]
        return SAEOutput(
            x_hat=x_hat_n / self.output_scale,
            features=torch.sparse_coo_tensor(torch.stack([support.rows, support.cols]), values.detach(), (batch, self.cfg.d_sae),
                                            is_coalesced=True, check_invariants=False),
            mse=error.pow(2).sum(-1).mean(),
            sparsity=sparsity,
            aux=self.aux_loss_sparse(pre, centred, error.detach(), dead_mask) + self.extra_loss_support(pre_values, values, support, y_n),
            l0=(torch.count_nonzero(values.detach()) / max(1, batch)).float(),
            fired=support.fired(values.detach()),
        )

    # ---- decoder geometry (Bricken et al. 2023, "Interaction between Adam and decoder normalisation") ----
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Put every decoder row back on the unit sphere (after each optimiser step)."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row: it would only change the row's norm."""
        if self.W_dec.grad is None:
            return
        # No [d_sae, d_in] temporary: at 24,576 × 768 the product and subtraction took ~60 ms a step, addcmul_ alone
        # ~8 (profiled). The row dot products go 1,024 rows at a time, so vecdot's own product stays in cache: 7.6 →
        # 4.7 ms at 16,384 × 768.
        grad, rows = self.W_dec.grad, self.W_dec.data
        parallel = torch.empty(grad.shape[0], dtype=grad.dtype, device=grad.device)
        for start in range(0, grad.shape[0], 1024):
            torch.linalg.vecdot(grad[start:start + 1024], rows[start:start + 1024], dim=1, out=parallel[start:start + 1024])
        grad.addcmul_(parallel.unsqueeze(1), rows, value=-1)

    # ---- what training and folding do to an architecture's own tensors ---------------------------
    @torch.no_grad()
    def revive(self, dead: Tensor) -> list[tuple[nn.Parameter, tuple]]:
        """Reset an architecture's own parameters of the resampled latents ``dead`` (the trainer resets W_enc, b_enc
        and W_dec); returns (parameter, index) pairs whose Adam moments are then zeroed. None here."""
        return []

    @staticmethod
    def shift_pre_activations(tensors: dict[str, Tensor], delta: Tensor) -> None:
        """Rewrite float32 ``tensors`` so that ``z = (x − b_dec) W_enc`` may gain ``delta`` [d_sae] with every
        activation unchanged (a change of variables, monosemantic/interop/folding.py): here b_enc absorbs it."""
        tensors["b_enc"] = (tensors["b_enc"].double() + delta).float()

    # ---- tensors as stored in artifacts -----------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The named tensors of the artifact format (SAELens names and orientation): ``tensor_names``, each an
        attribute (a parameter, a buffer, or a property such as JumpReLU's threshold)."""
        return {name: getattr(self, name).detach().contiguous() for name in self.tensor_names}

    def running_state(self) -> dict[str, Tensor]:
        """The persistent buffers a run keeps beside its parameters (BatchTopK's running threshold): what a checkpoint
        stores and a resume restores for training to continue exactly."""
        parameters = {name for name, _ in self.named_parameters()}
        return {name: value for name, value in self.state_dict().items() if name not in parameters}

    @torch.no_grad()
    def load_running_state(self, tensors: dict[str, Tensor]) -> None:
        for name, value in self.running_state().items():
            if name not in tensors:
                raise ConfigError(f"the checkpoint holds no {name} (the {self.architecture} architecture's running state)")
            value.copy_(tensors[name])

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Fill the parameters from named tensors, checking every name and shape."""
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ConfigError(f"dictionary tensors missing: {', '.join(missing)}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ConfigError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        # Into every named tensor the module holds as a parameter or buffer; one it derives (JumpReLU's threshold,
        # stored as log θ) its class loads itself.
        held = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name in self.tensor_names:
            if name in held:
                held[name].data.copy_(tensors[name].to(held[name].dtype))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The four shared tensors' shapes; every further one in ``tensor_names`` holds one value per feature but
        where ``own_shapes`` says otherwise (a skip transcoder's W_skip)."""
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        shared = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, self.d_out), "b_dec": (self.d_out,), **self.own_shapes()}
        return {**shared, **{name: (d_sae,) for name in self.tensor_names if name not in shared}}

    def own_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of an architecture's tensors that are not one value per feature; none here."""
        return {}


@register("relu")
class ReluSAE(SparseAutoencoder):
    """Bricken et al. 2023: f = ReLU(W_enc(x − b_dec) + b_enc), loss = MSE + λ·‖f‖₁."""

    # λ_L1 = 5 is the Apr-2024 Anthropic 1L-MLP setting that lands near L0 40 at 131k features (a start only when
    # the target-L0 controller steers it).
    default_sparsity_coefficient = 5.0
    resamples_dead_features = True
    # From b_enc = 0 half the latents fire and L0 falls only at Adam's pace (reference harvest, 244 steps of 4,096,
    # target L0 28: L0 1,970 at step 25, 26 at the end, FVU 0.79, λ never moved); calibrated, FVU 0.31 at L0 29
    # (bench/RESULTS.md).
    calibrated_start = True

    def activate(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def activate_(self, pre: Tensor) -> Tensor:
        return pre.relu_()

    def activate_at(self, pre_at: Tensor, ids: Tensor) -> Tensor:
        return F.relu(pre_at)

    def sparsity_penalty(self, pre: Tensor, features: Tensor) -> Tensor:
        # With unit-norm decoder rows the plain L1 of f is the paper's penalty.
        return features.sum(-1, dtype=torch.float32).mean()

    def support(self, pre: Tensor) -> Support:
        return Support.from_mask(pre > 0)

    def activate_support(self, pre_values: Tensor, support: Support) -> Tensor:
        return F.relu(pre_values)

    def support_sparsity(self, pre_values: Tensor, values: Tensor, support: Support) -> Tensor:
        return values.sum() / support.batch


@register("topk")
class TopKSAE(SparseAutoencoder):
    """Gao et al. 2024: keep the k largest pre-activations (ReLU'd); no sparsity penalty, AuxK on dead latents."""

    takes_k = True
    has_sparsity_coefficient = False
    uses_dead_mask = True  # AuxK
    AUX_COEFFICIENT: ClassVar[float] = 1.0 / 32.0  # Gao et al. 2024 §2.4 / openai/sparse_autoencoder auxk_coef

    def top_k(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        indices = topk_indices(pre, self.cfg.k)  # monosemantic/block_topk.py: torch.topk's values, ~2× faster on CPU
        return F.relu(pre.gather(-1, indices)), indices

    def dead_top_k(self, pre: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
        """The k_aux largest pre-activations of dead latents per row [batch, k_aux] (values, latent indices). With
        few dead latents their columns are gathered (a [batch, dead] read) instead of masking every live one."""
        dead = dead_mask.nonzero().squeeze(1)
        if 2 * dead.numel() <= self.cfg.d_sae:
            columns = pre.index_select(-1, dead)
            chosen = topk_indices(columns, k_aux)
            return columns.gather(-1, chosen), dead[chosen]
        indices = topk_indices(pre.masked_fill(~dead_mask, -math.inf), k_aux)
        return pre.gather(-1, indices), indices

    def activate(self, pre: Tensor) -> Tensor:
        values, indices = self.top_k(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def activate_(self, pre: Tensor) -> Tensor:
        values, indices = self.top_k(pre)  # copies: pre can be cleared
        return pre.zero_().scatter_(-1, indices, values)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """Normalised-space reconstruction from only the k active rows (no dense [batch, d_sae] product)."""
        flat_idx = indices.reshape(-1, indices.shape[-1])
        flat_val = values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype)
        out = F.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_val, mode="sum")
        return out.reshape(*indices.shape[:-1], self.d_out) + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        x_n = x * self.cfg.input_scale
        y_n = self.target_of(x_n, target)
        pre = self.pre_activations(x_n)
        values, indices = self.top_k(pre)
        x_hat_n = self.with_skip(self.decode_sparse(values, indices), x_n)
        error = y_n.float() - x_hat_n.float()
        features = torch.zeros_like(pre).scatter_(-1, indices, values.to(pre.dtype))
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and bool(dead_mask.any()):
            aux = self.AUX_COEFFICIENT * self._aux_loss(pre, error.detach(), dead_mask)
        return SAEOutput(
            x_hat=x_hat_n / self.output_scale,
            features=features,
            mse=error.pow(2).sum(-1).mean(),
            sparsity=torch.zeros((), device=x.device),
            aux=aux,
            l0=(values > 0).float().sum(-1).mean().detach(),
            fired=(features.detach() > 0).reshape(-1, self.cfg.d_sae).any(0),
        )

    def support(self, pre: Tensor) -> Support:
        # The k chosen latents per token: the encoder's backward costs O(batch·k·d_in), not two dense matmuls.
        return Support.from_indices(topk_indices(pre, self.cfg.k), self.cfg.d_sae)

    def activate_support(self, pre_values: Tensor, support: Support) -> Tensor:
        return F.relu(pre_values)

    def support_sparsity(self, pre_values: Tensor, values: Tensor, support: Support) -> Tensor:
        return torch.zeros((), device=pre_values.device)

    def aux_loss_sparse(self, pre: Tensor, centred: Tensor, error: Tensor, dead_mask: Tensor | None) -> Tensor:
        """``_aux_loss`` with the dead latents' encoder gradient taken on their top-k_aux support only."""
        if dead_mask is None or not bool(dead_mask.any()):
            return torch.zeros((), device=pre.device)
        k_aux = min(self.cfg.k_aux or self.d_out // 2, int(dead_mask.sum()))
        with torch.no_grad():
            _, indices = self.dead_top_k(pre, dead_mask, k_aux)
        support = Support.from_indices(indices, self.cfg.d_sae)
        values = F.relu(support_pre_activations(pre, centred, support, self.W_enc, self.b_enc, self.input_bias))
        return self.AUX_COEFFICIENT * self._normalised_residual(decode_support(values, support, self.W_dec), error)

    def _aux_loss(self, pre: Tensor, error: Tensor, dead_mask: Tensor) -> Tensor:
        # AuxK (Gao et al. 2024 §2.4, App. A.2): the top-k_aux *dead* latents model the main residual error,
        # normalised by the error's variance as openai/sparse_autoencoder does, so a dead latent gets gradient.
        k_aux = min(self.cfg.k_aux or self.d_out // 2, int(dead_mask.sum()))
        values, indices = self.dead_top_k(pre, dead_mask, k_aux)
        error_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=F.relu(values).to(self.W_dec.dtype), mode="sum")
        return self._normalised_residual(error_hat, error)

    @staticmethod
    def _normalised_residual(error_hat: Tensor, error: Tensor) -> Tensor:
        residual = (error_hat.float() - error).pow(2).sum(-1).mean()
        scale = (error - error.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        return torch.nan_to_num(residual / scale, nan=0.0)


class _JumpReLUWithL0(torch.autograd.Function):
    """JumpReLU_θ(z) = z·H(z − θ) and the L0 per row, Σ H(z − θ) / rows, in one pass over z each way.

    Pseudo-gradients (Rajamanoharan et al. 2024, rectangle kernel K of width ε; the same as SAELens and
    dictionary_learning): ∂JumpReLU/∂θ = −(θ/ε)·K((z−θ)/ε), ∂H/∂θ = −(1/ε)·K((z−θ)/ε); z gets the ordinary 1{z>θ}
    and nothing from the step. One function for both because they share the comparison z > θ forward and the
    window |z − θ| < ε/2 backward, each computed once. ``threshold`` is [d_sae] (broadcast over rows) or one per
    entry of ``pre`` (the support step's values)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float, rows: int):  # type: ignore[override]
        active = pre > threshold
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.rows = bandwidth, rows
        return pre * active, torch.count_nonzero(active).float() / rows  # count_nonzero: 12× faster than a float sum here

    @staticmethod
    def backward(ctx, grad_features: Tensor, grad_l0: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_features * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            in_window = (pre - threshold).abs_() < eps / 2
            per_row = threshold.shape != pre.shape
            # Σ over rows of K·(−θ/ε · g_f − 1/ε · g_L0/rows): the two estimators' sum, accumulated in fp32.
            windowed_grad = torch.where(in_window, grad_features, 0)
            windowed_grad = windowed_grad.sum(0, dtype=torch.float32) if per_row else windowed_grad.float()
            in_window_count = in_window.sum(0, dtype=torch.float32) if per_row else in_window.float()
            grad_threshold = (-(threshold.float() / eps) * windowed_grad - in_window_count * (grad_l0 / (eps * ctx.rows))).to(threshold.dtype)
        return grad_pre, grad_threshold, None, None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Rajamanoharan et al. 2024: per-feature learned thresholds θ = exp(t), loss = MSE + λ·‖f‖₀."""

    tensor_names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    # λ_L0: of the same order as ReLU's λ_L1 once the target-L0 controller has settled; with a target only a start.
    default_sparsity_coefficient = 1.0
    learned_threshold = True
    calibrated_start = True
    # In normalised units (E‖x‖ = √d_in). The trainer then sets b_enc so that each feature fires on a chosen share
    # of the data (trainer/train.py). Measured on the reference harvest, 2M tokens, target L0 20: θ₀ 0.5 left L0 at
    # 62 (still falling), 1.0 reached 30 at FVU 0.160, and 2.0 undershot to 13.5 with 1% dead. A threshold well
    # above the bandwidth also lets log θ move at a pace comparable to b_enc's (Adam steps are relative in log space).
    INITIAL_THRESHOLD: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(self.INITIAL_THRESHOLD)))
        # The threshold exactly as loaded, used while not training: exp(log θ) is θ only to within a bit or two,
        # and at the threshold one bit decides whether a feature fires — an imported dictionary must fire where
        # its source did. Dropped by train(): training moves log_threshold.
        self.register_buffer("exact_threshold", None, persistent=False)

    @property
    def threshold(self) -> Tensor:
        if self.exact_threshold is not None and not self.training:
            return self.exact_threshold
        return self.log_threshold.exp()

    def firing_threshold(self) -> Tensor:
        return self.threshold

    def train(self, mode: bool = True) -> "JumpReLUSAE":
        if mode:
            self.exact_threshold = None
        return super().train(mode)

    def _flat(self, pre: Tensor) -> Tensor:
        return pre.reshape(-1, pre.shape[-1])

    def activate(self, pre: Tensor) -> Tensor:
        return self.activate_with_sparsity(pre)[0]

    def activate_(self, pre: Tensor) -> Tensor:
        return pre.masked_fill_(pre <= self.threshold.to(pre.dtype), 0)  # z·H(z − θ), without the L0 estimate

    def activate_at(self, pre_at: Tensor, ids: Tensor) -> Tensor:
        return pre_at.masked_fill(pre_at <= self.threshold[ids].to(pre_at.dtype), 0)

    def activate_with_sparsity(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        flat = self._flat(pre)
        features, l0 = _JumpReLUWithL0.apply(flat, self.threshold.to(pre.dtype), self.cfg.bandwidth, flat.shape[0])
        return features.reshape(pre.shape), l0

    def support(self, pre: Tensor) -> Support:
        # The active latents and those inside the pseudo-gradient window |z − θ| < ε/2, whose θ still learns.
        return Support.from_mask(pre > (self.threshold.detach() - self.cfg.bandwidth / 2).to(pre.dtype))

    def activate_support_with_sparsity(self, pre_values: Tensor, support: Support) -> tuple[Tensor, Tensor]:
        return _JumpReLUWithL0.apply(pre_values, self.threshold[support.cols], self.cfg.bandwidth, support.batch)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_tensors(tensors)
        threshold = tensors["threshold"].to(self.log_threshold.dtype)
        if bool((threshold < 0).any()):
            raise ConfigError("tensor threshold holds negative values (a JumpReLU threshold is at least 0)")
        self.log_threshold.data.copy_(threshold.clamp_min(1e-12).log())
        self.exact_threshold = threshold.clone()


def build_sae(cfg: SAEConfig, seed: int | None = None) -> SparseAutoencoder:
    """Instantiate the registered class for ``cfg.architecture``."""
    return architecture_class(cfg.architecture)(cfg, seed=seed)


def sae_from_tensors(cfg: SAEConfig, tensors: dict[str, Tensor]) -> SparseAutoencoder:
    """Rebuild a dictionary from its config and named tensors (the artifact loader's entry point)."""
    sae = build_sae(cfg)
    sae.load_tensors(tensors)
    return sae.eval()


@torch.no_grad()
def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance (b_dec's start, Bricken et al.)."""
    points = points.float()
    median = points.mean(0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return updated
        median = updated
    return median


# Architectures defined in their own modules register on import; imported here, after the classes they extend, so
# that the registry is whole whenever monosemantic.sae is.
from monosemantic import batchtopk, gated, matryoshka, transcoder  # noqa: E402,F401
