"""Attribution of a target logit (or logit difference) to SAE features, the SAE error and the rest of the model.

With the SAE spliced in, the activation at the hook is x = Σ_i f_i d_i + b + e (d_i the decoder rows, b the
decoder bias, e the error). Each feature gets f_i · ∂v/∂f_i and the error e · ∂v/∂e (activation × gradient,
Marks et al. 2024 "Sparse Feature Circuits"), with the final norm's scale frozen at its forward value so that
the path from the hook to the logits is linear wherever nothing non-linear lies between (hook in the last
block, see monosemantic.lm.linear_to_logits). `rest` is measured, not inferred: a second forward with the hook
holding only b (every feature off, no error) under the same frozen scale. In the linear case
value = features + error + rest up to rounding; elsewhere the difference is reported as the remainder.

A transcoder reads its features at its input hook and is spliced in at its output hook (the MLP replaced by it: y =
Σ_i f_i d_i + b + x W_skipᵀ + e), so everything from the output hook to the logit is the model's; its skip path, linear
and no feature, is part of `rest`, and the result is exact where the output hook's path to the logits is linear.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from monosemantic.bound import BoundDictionary
from monosemantic.lm import final_norm, hooked_replacement, linear_to_logits, norm_at_scale, norm_inverse_scale
from monosemantic.model import Model


class FeatureScore(NamedTuple):
    position: int
    feature: int
    activation: float
    attribution: float


@dataclass
class Attribution:
    value: float
    exact: bool
    features_total: float
    error: float
    rest: float
    remainder: float
    scores: Tensor  # [T, d_sae] activation × gradient
    activations: Tensor  # [T, d_sae]

    def strongest(self, k: int) -> list[FeatureScore]:
        """The k (position, feature) pairs with the largest |attribution|, largest first; only nonzero ones."""
        k = min(k, int((self.scores != 0).sum()))
        flat = self.scores.flatten()
        order = flat.abs().topk(k).indices if k else flat[:0].long()
        d_sae = self.scores.shape[-1]
        acts = self.activations.flatten()
        return [FeatureScore(int(i) // d_sae, int(i) % d_sae, float(acts[i]), float(flat[i])) for i in order]


@contextmanager
def frozen_norm_scale(module: nn.Module | None, store: dict) -> Iterator[None]:
    """Within the context the norm's 1/σ is a constant: recorded on the first forward, reused on later ones."""
    if module is None:
        yield
        return

    def hook(mod: nn.Module, args: tuple, _output: Tensor) -> Tensor:
        x = args[0]
        if "inv_scale" not in store:
            store["inv_scale"] = norm_inverse_scale(mod, x.detach())
        return norm_at_scale(mod, x, store["inv_scale"]).to(x.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _supported_norm(module: nn.Module | None) -> bool:
    if module is None:
        return False
    return isinstance(module, nn.LayerNorm) or ("RMSNorm" in type(module).__name__ and hasattr(module, "weight"))


def attribute(model: Model, dictionary: BoundDictionary, ids: list[int], position: int, target: int, contrast: int | None) -> Attribution:
    """Decompose logit(target) [− logit(contrast)] at `position` into `dictionary`'s features, its error and the rest."""
    net, sae, hook = model.lm.model, dictionary.sae, dictionary.hook
    written = dictionary.hook_out or hook  # where the dictionary's reconstruction is spliced in
    device = next(net.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    mask = torch.ones_like(input_ids)
    norm = final_norm(net)
    freeze = _supported_norm(norm)
    store: dict = {}
    leaves: dict[str, Tensor] = {}

    read: list[Tensor] = []  # a transcoder's input, as the model ran on it

    def capture(x: Tensor) -> Tensor:
        read[:] = [x.detach().float()]
        return x

    def splice(y: Tensor) -> Tensor:
        y = y.float()
        x = read[0] if dictionary.hook_out is not None else y
        features = sae.encode(x).detach().requires_grad_(True)
        fixed = sae.offset(x).detach()
        written_by_features = (features @ sae.W_dec) / sae.output_scale
        error = (y - written_by_features - fixed).detach().requires_grad_(True)
        leaves["features"], leaves["error"] = features, error
        return written_by_features + fixed + error

    def objective(logits: Tensor) -> Tensor:
        row = logits[0, position].float()
        return row[target] - (row[contrast] if contrast is not None else 0.0)

    def spliced(fn):
        """The forward's hooks: a transcoder's input read at its hook, ``fn`` where the dictionary writes."""
        hooks = ExitStack()
        hooks.enter_context(frozen_norm_scale(norm if freeze else None, store))
        if dictionary.hook_out is not None:
            hooks.enter_context(hooked_replacement(net, hook, capture))
        hooks.enter_context(hooked_replacement(net, written, fn))
        return hooks

    with torch.inference_mode(False), torch.enable_grad():
        with spliced(splice):
            value_spliced = objective(net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits)
        grad_features, grad_error = torch.autograd.grad(value_spliced, [leaves["features"], leaves["error"]])
    with torch.no_grad():
        # Every feature off and no error: the activation holds only what the dictionary writes regardless.
        with spliced(lambda y: sae.offset(read[0] if dictionary.hook_out is not None else y.float()).expand_as(y).to(y.dtype)):
            rest = float(objective(net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits))
        value = float(objective(net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits))  # the plain model, no SAE
        features = leaves["features"][0].detach()
        scores = features * grad_features[0]
        features_total = float(scores.double().sum())
        error = float((leaves["error"][0].detach() * grad_error[0]).double().sum())
    exact = freeze and linear_to_logits(net, written)
    return Attribution(
        value=value,
        exact=exact,
        features_total=features_total,
        error=error,
        rest=rest,
        remainder=value - features_total - error - rest,
        scores=scores,
        activations=features,
    )
