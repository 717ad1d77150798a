"""Requests of the Neuronpedia inference API as its published client (neuronpedia-inference-client 1.10.1) sends
them, and the one rule for field spelling.

Spelling: the published client sends and reads snake_case (`source_set`, `max_value`); Neuronpedia's current server
answers camelCase (`sourceSet`, `maxValue`) and its webapp sends and reads camelCase. Every request here accepts
either spelling of every field, and the answer is spelled as the caller spelled its request: camelCase when any
field name of more than one word in the body is camelCase, snake_case when any is snake_case; a body with no such
field (`{"model", "text"}`) is answered in snake_case when the caller is the published client (its User-Agent
starts with `OpenAPI-Generator/`) and in camelCase otherwise, as Neuronpedia's server answers. Two fields keep one
spelling in both, as the client names them: `activeFeatures` and `hookName`.

Unknown fields are refused (422) rather than ignored: a field this server does not implement could change what
an answer means.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.alias_generators import to_camel

from monosemantic.api import Text

Number = StrictFloat | StrictInt
CLIENT_USER_AGENT = "OpenAPI-Generator/"


class _Request(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", protected_namespaces=())


class _AllOptions(_Request):
    model: StrictStr
    source_set: StrictStr
    selected_sources: list[StrictStr] = Field(default_factory=list, description="[]: every source of the set")
    sort_by_token_indexes: list[StrictInt] = Field(default_factory=list, description="rank by the sum at these positions (BOS is 0)")
    ignore_bos: StrictBool = False
    num_results: StrictInt | None = Field(25, ge=0)


class ActivationAllRequest(_AllOptions):
    prompt: Text


class ActivationAllBatchRequest(_AllOptions):
    prompts: list[Text] = Field(min_length=1)


class _SingleOptions(_Request):
    model: StrictStr
    source: StrictStr | None = None
    index: StrictStr | StrictInt | None = None
    vector: list[Number] | None = None
    hook: StrictStr | None = None


class ActivationSingleRequest(_SingleOptions):
    prompt: Text


class ActivationSingleBatchRequest(_SingleOptions):
    prompts: list[Text] = Field(min_length=1)


class _TopkOptions(_Request):
    model: StrictStr
    source: StrictStr
    top_k: StrictInt | None = Field(None, ge=1, description="default 5")
    ignore_bos: StrictBool = False


class ActivationTopkByTokenRequest(_TopkOptions):
    prompt: Text


class ActivationTopkByTokenBatchRequest(_TopkOptions):
    prompts: list[Text] = Field(min_length=1)


class ActivationSourceRequest(_Request):
    prompts: list[Text] = Field(min_length=1, max_length=4)
    model: StrictStr
    source: StrictStr


class SteerMethod(str, Enum):
    SIMPLE_ADDITIVE = "SIMPLE_ADDITIVE"
    ORTHOGONAL_DECOMP = "ORTHOGONAL_DECOMP"
    PROJECTION_CAP = "PROJECTION_CAP"


class SteerType(str, Enum):
    STEERED = "STEERED"
    DEFAULT = "DEFAULT"


class SteerFeature(_Request):
    model: StrictStr
    source: StrictStr
    index: StrictInt
    strength: Number
    steering_vector: list[Number] | None = None  # the client's model has it; the server fills it from the decoder


class SteerVector(_Request):
    steering_vector: list[Number] = Field(min_length=1)
    strength: Number
    hook: StrictStr


class SteerCompletionRequest(_Request):
    prompt: Text
    model: StrictStr
    steer_method: SteerMethod = SteerMethod.SIMPLE_ADDITIVE
    normalize_steering: StrictBool = False
    types: list[SteerType] = Field(min_length=1)
    features: list[SteerFeature] | None = None
    vectors: list[SteerVector] | None = None
    n_completion_tokens: StrictInt = Field(ge=1)
    temperature: Number = Field(ge=0)
    strength_multiplier: Number = 1
    freq_penalty: Number = 0
    seed: Number = 0
    stream: StrictBool = False
    n_logprobs: StrictInt = Field(0, ge=0, le=10)


class TokenizeRequest(_Request):
    model: StrictStr
    text: Text
    prepend_bos: StrictBool | None = None


class SaeVectorRequest(_Request):
    model: StrictStr
    source: StrictStr
    index: StrictInt


class Feature(_Request):
    model: StrictStr
    source: StrictStr
    index: StrictInt


class TopkByDecoderCossimRequest(_Request):
    feature: Feature | None = None
    vector: list[Number] | None = None
    model: StrictStr
    source: StrictStr
    num_results: Annotated[int, Field(strict=True)] = Field(description="clamped to 1..128 and to the source's features")


# ---- spelling ----------------------------------------------------------------------------------------------------
def _keys(value: Any) -> Any:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _keys(inner)


def caller_spells_camel(body: Any, user_agent: str | None) -> bool:
    """The module docstring's rule: the body's multi-word field names decide; without one, the User-Agent."""
    for key in _keys(body):
        if not isinstance(key, str):
            continue
        if "_" in key.strip("_"):
            return False
        if any(c.isupper() for c in key[1:]) and key[:1].islower():
            return True
    return not (user_agent or "").startswith(CLIENT_USER_AGENT)


def spelled(value: Any, camel: bool) -> Any:
    """An answer built with snake_case keys, in the caller's spelling. Only keys are renamed: a key that is data
    (activation/source's feature indices, "123") has no underscore and passes unchanged."""
    if not camel:
        return value
    if isinstance(value, dict):
        return {to_camel(k) if isinstance(k, str) else k: spelled(v, True) for k, v in value.items()}
    if isinstance(value, list):
        return [spelled(v, True) for v in value]
    return value
