"""The checks a request passes before it is queued, by meaning (pydantic has already checked the types): token ids
in the vocabulary, features in their dictionary, every size under its setting — each refusal naming its field."""

from __future__ import annotations

import math

from monosemantic import api
from monosemantic.bound import BoundDictionary
from monosemantic.model import Model, Tokenized
from service.errors import invalid, over_limit
from service.settings import ServiceSettings
from service.tokenizing import Tokenizing


class Limits:
    def __init__(self, settings: ServiceSettings, tokenizing: Tokenizing) -> None:
        self.settings, self._tokenizing = settings, tokenizing

    def max_tokens(self, model: Model) -> int:
        return min(self.settings.max_tokens or model.max_positions, model.max_positions)

    async def token_ids(self, model: Model, field: str, text: str | None, token_ids: list[int] | None, prepend_bos: bool) -> Tokenized:
        s = self.settings
        if text is not None:
            if len(text) > s.max_text_chars:
                raise over_limit(field, len(text), s.max_text_chars, "max_text_chars")
            tokenized = (await self._tokenizing.tokenize(model, [text], prepend_bos))[0]
        else:
            ids, field = list(token_ids or []), "token_ids"
            bad = next((i for i, t in enumerate(ids) if not 0 <= t < model.vocab_size), None)
            if bad is not None:
                raise invalid(f"token_ids[{bad}]", f"{ids[bad]} is not a token id (vocabulary size {model.vocab_size})")
            tokenized = Tokenized(ids, [(0, 0)] * len(ids))
        if not tokenized.ids:
            raise invalid(field, "is empty: there is no token to read")
        limit = self.max_tokens(model)
        if len(tokenized.ids) > limit:
            raise over_limit(field, len(tokenized.ids), limit, "max_tokens")
        return tokenized

    def top_k(self, field: str, value: int) -> int:
        if value > self.settings.max_top_k:
            raise over_limit(field, value, self.settings.max_top_k, "max_top_k")
        return value

    @staticmethod
    def feature(dictionary: BoundDictionary, field: str, feature: int, missing=invalid) -> int:
        if not 0 <= feature < dictionary.d_sae:
            raise missing(field, f"{feature} is not a feature of dictionary {dictionary.name} v{dictionary.version} (0 ≤ id < {dictionary.d_sae})")
        return feature

    def feature_ids(self, dictionary: BoundDictionary, wanted: list[int] | None) -> list[int] | None:
        if wanted is None:
            return None
        if len(wanted) > self.settings.max_feature_ids:
            raise over_limit("feature_ids", len(wanted), self.settings.max_feature_ids, "max_feature_ids")
        for i, feature in enumerate(wanted):
            self.feature(dictionary, f"feature_ids[{i}]", feature)
        return wanted

    @staticmethod
    def single_token(model: Model, field: str, spec: int | str) -> int:
        if isinstance(spec, int):
            if not 0 <= spec < model.vocab_size:
                raise invalid(field, f"{spec} is not a token id (vocabulary size {model.vocab_size})")
            return spec
        ids = model.tokenize(spec, prepend_bos=False).ids
        if len(ids) != 1:
            raise invalid(field, f"{spec!r} is {len(ids)} tokens, not one; give a single token or its id")
        return ids[0]

    def page_size(self, value: int) -> int:
        if value > self.settings.max_page_size:
            raise over_limit("page_size", value, self.settings.max_page_size, "max_page_size")
        return value

    def generation(self, model: Model, req: api.GenerateRequest) -> None:
        """Sampling settings, stop strings and the steering list's size and values (features are checked
        against their dictionaries by the engine, which resolves them)."""
        s = self.settings
        if req.max_new_tokens > s.max_new_tokens:
            raise over_limit("max_new_tokens", req.max_new_tokens, s.max_new_tokens, "max_new_tokens")
        if not math.isfinite(req.temperature):
            raise invalid("temperature", "must be a finite number")
        if req.top_k > model.vocab_size:
            raise invalid("top_k", f"{req.top_k} is larger than the vocabulary ({model.vocab_size})")
        self.top_k("features_top_k", req.features_top_k)
        if len(req.stop) > s.max_stop_strings:
            raise over_limit("stop", len(req.stop), s.max_stop_strings, "max_stop_strings")
        for i, stop in enumerate(req.stop):
            if not stop or len(stop) > 100:
                raise invalid(f"stop[{i}]", "must be 1 to 100 characters")
        if len(req.steering) > s.max_steering:
            raise over_limit("steering", len(req.steering), s.max_steering, "max_steering")
        for i, entry in enumerate(req.steering):
            if not math.isfinite(entry.value):
                raise invalid(f"steering[{i}].value", "must be a finite number")
