"""Typed requests and responses of the v1 API (the README's "The service"), shared by the service and the client.

REST serves these models as they are; gRPC messages are converted to and from them (monosemantic.wire), so both
transports share one set of field rules."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator

# A steering value's bound, in the feature's activation units: far above any feature's activation (the shipped
# dictionary's largest is ~20, Gemma Scope's a few hundred), and far enough below float32's 3.4e38 that neither the
# steered activation nor the squares a normalisation layer takes of it can overflow to inf / NaN.
MAX_STEERING_VALUE = 1e6


def _unicode_text(value: str) -> str:
    """Refuse lone surrogates (U+D800-U+DFFF): JSON can escape them ("\\ud800") and Python's decoder lets them
    through, but they are not text: no tokenizer can encode them, and no UTF-8 response can carry them back."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode: a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}") from None
    return value


# Every text a request carries, on both transports (gRPC messages are validated through these models too).
# Ids (tokens, features) are StrictInt: JSON `true` is not token 1, as pydantic's lax mode would take it.
Text = Annotated[str, AfterValidator(_unicode_text)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


DICTIONARY_FIELD = "the dictionary to use, name or name:version (vN); default: the first the server loaded"


class _OnDictionary(_Request):
    """An operation on one loaded dictionary, addressed by name."""

    dictionary: Text | None = Field(None, description=DICTIONARY_FIELD)


class _OnDictionaries(_OnDictionary):
    """An operation that may read several loaded dictionaries in one forward."""

    dictionaries: list[Text] | None = Field(None, description="several dictionaries read in one forward (the model runs once, as deep as "
                                                              "the deepest hook); each one's result in `readouts`, in this order")

    @model_validator(mode="after")
    def _one_way_to_name(self) -> "_OnDictionaries":
        if self.dictionary is not None and self.dictionaries:
            raise ValueError("give dictionary or dictionaries, not both")
        if self.dictionaries is not None and len(set(self.dictionaries)) != len(self.dictionaries):
            raise ValueError("dictionaries: a dictionary is listed twice")
        return self

    def named(self) -> list[str | None]:
        """The dictionaries asked for, in order ([None]: the default)."""
        return list(self.dictionaries) if self.dictionaries else [self.dictionary]


class DictionaryRef(BaseModel):
    name: str
    version: int


class FeatureValue(BaseModel):
    feature: int
    value: float


# ---- activations -----------------------------------------------------------------------------------------------
class ActivationsRequest(_OnDictionaries):
    text: Text | None = Field(None, description="the text to read; exactly one of text and token_ids")
    token_ids: list[StrictInt] | None = Field(None, description="token ids to read as they are (no BOS is added); an empty list counts as not given")
    top_k: int = Field(10, ge=0, description="features reported per token, strongest first")
    feature_ids: list[StrictInt] | None = Field(None, description="features whose value is reported at every token (with one dictionary)")
    prepend_bos: bool = Field(True, description="start the text with the tokenizer's BOS token, as in training")

    @model_validator(mode="after")
    def _one_input(self) -> "ActivationsRequest":
        if (self.text is None) == (not self.token_ids):
            raise ValueError("give exactly one of text and token_ids")
        return self


class TokenActivations(BaseModel):
    id: int
    text: str
    start: int = Field(description="character offset of the token in the text (0 for BOS and token-id input)")
    end: int
    l0: int = Field(description="features active at this token")
    recon_error: float = Field(description="relative reconstruction error ||x - x_hat|| / ||x|| (a transcoder's: of the output it predicts)")
    top: list[FeatureValue]
    values: list[float] = Field(default_factory=list, description="values of the requested feature_ids, in that order (empty if none were requested)")


class DictionaryReadout(BaseModel):
    dictionary: DictionaryRef
    tokens: list[TokenActivations]


class ActivationsResponse(BaseModel):
    dictionary: DictionaryRef = Field(description="the (first) dictionary read")
    tokens: list[TokenActivations] = Field(description="its readout")
    readouts: list[DictionaryReadout] = Field(default_factory=list, description="with `dictionaries`: every one's readout, in the order asked "
                                                                                   "(the first is the same as `tokens`); empty otherwise")


# ---- attributions ----------------------------------------------------------------------------------------------
class AttributionsRequest(_OnDictionary):
    text: Text
    target: StrictInt | Text = Field(description="the token whose logit is explained: an id or its text (one token)")
    position: int | None = Field(None, description="the position whose next-token logit is explained (default: last); negative counts from the end")
    contrast: StrictInt | Text | None = Field(None, description="explain logit(target) - logit(contrast) instead")
    top_k: int = Field(20, ge=0)
    prepend_bos: bool = True


class FeatureAttribution(BaseModel):
    position: int
    feature: int
    activation: float
    attribution: float


class AttributionsResponse(BaseModel):
    dictionary: DictionaryRef
    value: float = Field(description="the target logit (or logit difference) = features_total + error + rest + remainder")
    exact: bool = Field(description="true when everything after the hook is linear (frozen final norm), so remainder is only rounding")
    features_total: float = Field(description="sum of activation x gradient over every feature and position")
    error: float = Field(description="share of the SAE's reconstruction error")
    rest: float = Field(description="the value with every feature off and no error (the hook holding the decoder bias)")
    remainder: float = Field(description="what the first-order decomposition misses")
    position: int
    target_id: int
    contrast_id: int | None = None
    features: list[FeatureAttribution]


# ---- generate --------------------------------------------------------------------------------------------------
class Steering(_Request):
    dictionary: Text | None = Field(None, description="the dictionary the feature belongs to; default: the request's")
    feature: StrictInt
    mode: Literal["clamp", "add"] = Field(description="clamp: pin the feature's activation to value; add: add value x its decoder direction")
    value: float = Field(ge=-MAX_STEERING_VALUE, le=MAX_STEERING_VALUE, allow_inf_nan=False, description=f"in the feature's activation units, |value| <= {MAX_STEERING_VALUE:g}")


class GenerateRequest(_OnDictionary):
    prompt: Text
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens; 0 is no limit")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="the same seed gives the same text")
    stop: list[Text] = Field(default_factory=list)
    steering: list[Steering] = Field(default_factory=list)
    steer_prompt: bool = Field(True, description="steer the prompt's positions too; false steers generated positions only")
    features_top_k: int = Field(5, ge=0, description="features of the request's dictionary reported per generated token")
    compare_unsteered: bool = Field(False, description="also return the unsteered continuation with the same seed")
    prepend_bos: bool = True
    stream: bool = Field(False, description="REST only: answer as server-sent events `token` ... `done`")


class SteeredValue(BaseModel):
    dictionary: str = Field("", description="the name of the feature's dictionary")
    feature: int
    before: float
    after: float


class GeneratedToken(BaseModel):
    index: int
    id: int
    text: str
    top: list[FeatureValue] = Field(description="features at the position that predicted this token (after steering)")
    steered: list[SteeredValue] = Field(description="each steered feature there, before and after steering")


class Continuation(BaseModel):
    text: str
    tokens: list[GeneratedToken]
    finish_reason: Literal["length", "stop", "eos"]


class GenerateResponse(Continuation):
    dictionary: DictionaryRef
    seed: int = Field(description="the seed used (drawn at random when the request gave none)")
    unsteered: Continuation | None = None


# ---- features (dashboards and search) -------------------------------------------------------------------------
class WindowExample(BaseModel):
    value: float = Field(description="the feature's activation at the example token")
    centre: int = Field(description="index of the example token in the window")
    token_ids: list[int]
    tokens: list[str]
    activations: list[float] = Field(description="the feature's activation at every token of the window")
    quantile: int | None = Field(None, description="for sampled examples: the interval of the feature's max it was drawn from (0 lowest)")


class LogitEffect(BaseModel):
    id: int
    token: str
    value: float


class Neighbour(BaseModel):
    feature: int
    cosine: float
    label: str


class Counterpart(BaseModel):
    dictionary: str = Field(description="the other loaded dictionary, name:vN")
    feature: int
    cosine: float = Field(description="of the two features' decoder directions")
    label: str


class ExplanationScore(BaseModel):
    balanced_accuracy: float | None = Field(None, description="mean of the true-positive and true-negative rates (0.5 is chance); null when no answer parsed")
    examples: int = Field(description="answers counted")
    unparsed: int = Field(description="examples whose prompt's answer did not parse")
    true_positive_rate: float | None = None
    true_negative_rate: float | None = None


class SimulationScore(BaseModel):
    correlation: float | None = Field(None, description="Pearson's r of the activations predicted from the explanation and the true ones; null when none parsed")
    examples: int
    tokens: int
    unparsed: int
    from_logprobs: bool = Field(False, description="predictions read as expected values from the endpoint's logprobs")


class Explanation(BaseModel):
    explanation: str
    score: float | None = Field(None, description="the mean of the scorers' balanced accuracies; null when nothing was scored")
    detection: ExplanationScore | None = None
    fuzzing: ExplanationScore | None = None
    simulation: SimulationScore | None = None
    run: str = Field(description="the run's record in REGISTRY/NAME/explanations/vN/")
    explainer_model: str
    scorer_model: str
    prompt_version: str


class Histogram(BaseModel):
    log10_edges: list[float]
    counts: list[int]


class FeatureResponse(BaseModel):
    dictionary: DictionaryRef
    feature: int
    label: str
    density: float = Field(description="fraction of tokens on which the feature fires")
    mean_activation: float = Field(description="mean activation where it fires")
    max_activation: float
    histogram: Histogram = Field(description="activations where it fires, by log10 bins")
    top_examples: list[WindowExample]
    quantile_examples: list[WindowExample]
    logit_up: list[LogitEffect] = Field(description="tokens whose logits the decoder direction raises most (direct path)")
    logit_down: list[LogitEffect]
    neighbours: list[Neighbour] = Field(description="features with the closest decoder directions")
    statistics_tokens: int = Field(description="tokens the statistics were computed over")
    counterparts: list[Counterpart] = Field(default_factory=list, description="the closest features (decoder cosine) of each "
                                            "other loaded dictionary that writes into the same space (same model and hook)")
    explanations: list[Explanation] = Field(default_factory=list, description="every run's explanation (monosemantic-train "
                                            "explain), best-scoring first; empty when none")


SearchBy = Literal["token", "snippet", "feature", "explanation"]


class SearchFeaturesRequest(_OnDictionary):
    q: Text = Field(description="a token (by=token), a text snippet (by=snippet), or a feature id of dictionary `of` (by=feature)")
    by: SearchBy = "snippet"
    of: str | None = Field(None, description="by=feature: the loaded dictionary whose feature q is (default: the one searched)")
    page: int = Field(1, ge=1)
    page_size: int = Field(20, ge=1)


class FeatureHit(BaseModel):
    feature: int
    label: str
    score: float = Field(description="by=snippet: the highest activation on the snippet over the feature's max; by=token: share of top examples peaking on the token, plus 0.5 if it is among the logits raised most; by=feature: the decoder cosine with that feature; by=explanation: the best score of an explanation containing every word of q (0 when unscored)")
    density: float
    max_activation: float
    explanation: str = Field("", description="its best-scoring explanation; empty when none")


class SearchFeaturesResponse(BaseModel):
    dictionary: DictionaryRef
    by: str
    total: int
    page: int
    page_size: int
    results: list[FeatureHit]


class ListFeaturesRequest(_OnDictionary):
    order: Literal["density", "label", "id", "random"] = Field("density", description="density: most often firing first; label: "
                                                                 "labelled features alphabetically; id; random: a random sample of live features")
    page: int = Field(1, ge=1)
    page_size: int = Field(20, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="order=random: the same seed gives the same sample")
    below: int | None = Field(None, ge=1, description="only the features whose id is below this: a leading block of "
                              "the dictionary, such as one of a Matryoshka dictionary's prefixes (its matryoshka_widths)")


class FeatureSummary(BaseModel):
    feature: int
    label: str
    density: float
    max_activation: float
    explanation: str = Field("", description="its best-scoring explanation; empty when none")


class ListFeaturesResponse(BaseModel):
    dictionary: DictionaryRef
    order: str
    total: int = Field(description="features in this order (random: the live ones, density > 0)")
    page: int
    page_size: int
    results: list[FeatureSummary]


# ---- observe (monitoring) ---------------------------------------------------------------------------------------
class ObserveRequest(_OnDictionaries):
    texts: list[Text] = Field(min_length=1, description="texts read only for the feature-monitoring metrics")


class ObserveResponse(BaseModel):
    accepted: int = Field(description="texts accepted (read in the background)")
    tokens: int = Field(description="tokens that will be counted (BOS excluded)")


# ---- dictionaries ----------------------------------------------------------------------------------------------
class EvaluationInfo(BaseModel):
    recorded: str = Field(description="when it was run (UTC, ISO 8601)")
    model_checksum: str | None = Field(None, description="the model it ran on; none for an activation file")
    data: dict = Field(description="what it was measured on: kind (builtin-corpus | dataset | activation-file), dataset, fingerprint…")
    metrics: dict = Field(description="l0, fvu, mse, loss_recovered, dead_fraction, dense_fraction, tokens…")
    measured: str | None = Field(None, description="name:vN when it was measured on an earlier version with the same weights")


class DictionaryInfo(BaseModel):
    name: str
    version: int
    architecture: str
    d_in: int
    d_sae: int
    hook: str
    model_name: str
    model_checksum: str
    metrics: dict
    serving: bool
    default: bool = Field(False, description="the dictionary an operation uses when it names none")
    statistics: bool = Field(False, description="it has feature statistics: feature pages, lists and search work on it")
    matryoshka_widths: list[int] = Field(default_factory=list, description="a Matryoshka dictionary's nested prefix "
                                         "widths, the last d_sae (each prefix is a dictionary itself); empty for others")
    hook_out: str = Field("", description="a transcoder's output hook: it reads its features at hook and writes (is "
                          "steered, spliced in) here; empty for others")
    d_out: int = Field(0, description="the width it writes: d_in but for a transcoder")
    explained: int = Field(0, description="features with an explanation (monosemantic-train explain)")
    explanation_median_score: float | None = Field(None, description="the median of the explained features' best scores; null when none is scored")
    evaluations: list[EvaluationInfo] = Field(default_factory=list, description="evaluations run since publishing (monosemantic-train evaluate), oldest first")
    source: dict = Field(default_factory=dict, description="where an imported dictionary came from (format, location, "
                         "revision, the source's own config; monosemantic-train import); empty for one trained here")


class DictionariesResponse(BaseModel):
    dictionaries: list[DictionaryInfo] = Field(description="every loaded dictionary, the default first")
    available: list[DictionaryRef]


class ReloadRequest(_Request):
    name: Text
    version: int | None = Field(None, ge=1, description="default: the latest version")


class ReloadResponse(BaseModel):
    dictionary: DictionaryRef
    previous: DictionaryRef | None = Field(None, description="the version of this name it replaced; none when the name was not loaded")


class UnloadRequest(_Request):
    name: Text


class UnloadResponse(BaseModel):
    dictionary: DictionaryRef = Field(description="the dictionary unloaded")
    default: DictionaryRef = Field(description="the default dictionary now")


# ---- steering evaluation (monosemantic/steer_eval.py) ----------------------------------------------------------------
SteerMethod = Literal["clamp", "add", "mean_difference"]


class SteerEvalRequest(_OnDictionary):
    """Lists left empty (or absent) take their defaults: gRPC cannot tell an empty repeated field from an absent one."""

    feature: int = Field(ge=0, description="the feature to steer")
    texts: list[Text] = Field([], max_length=32, description="neutral held-out text, at least 2 contexts (cut to the shortest, "
                              "at least 9 tokens): the first half gives the prompts and the baseline's direction, the second the "
                              "KL and loss; empty: 16 samples of the model's own, 64 tokens each")
    multiples: list[Annotated[float, Field(ge=0, le=64, allow_inf_nan=False)]] = Field(
        [], max_length=16, description="strengths, in units of the feature's max activation (mean_difference: of the direction); "
                                       "empty: 0, 0.25, 0.5, 1, 2, 3, 4, 8, 16")
    methods: list[SteerMethod] = Field([], max_length=3, description="empty: clamp, add and mean_difference")
    kl_budgets: list[Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]] = Field([], max_length=4, description="empty: 0.1, 0.5")
    effect: Literal["reading", "promoted"] = Field("reading", description="what each method's best strength maximises")
    new_tokens: int = Field(24, ge=1, le=64, description="tokens generated per continuation")
    prompts: int = Field(8, ge=1, le=16, description="continuations generated per strength")


class SteerPoint(BaseModel):
    multiple: float
    strength: float = Field(description="a feature activation (clamp, add) or the coefficient of the direction (mean_difference)")
    kl: float | None = Field(None, description="mean KL(unsteered || steered) of the next-token distribution on the held-out text; null: not finite")
    loss: float | None = None
    promoted: float | None = Field(None, description="probability of the tokens the feature promotes, on the held-out text")
    reading: float | None = Field(None, description="the feature's mean activation on steered continuations read back unsteered, over its scale")
    firing: float | None = Field(None, description="share of those continuation tokens where it fires")


class SteerCurve(BaseModel):
    method: SteerMethod
    points: list[SteerPoint]


class SteerBest(BaseModel):
    budget: float
    method: SteerMethod
    point: SteerPoint | None = Field(None, description="the point of most effect within the KL budget; null: every point exceeds it")


class SteerWinner(BaseModel):
    budget: float
    method: SteerMethod | None = Field(None, description="the method of most effect within the budget; null: none beats the model unsteered")


class PromotedToken(BaseModel):
    id: int
    token: str


class SteerEvalResponse(BaseModel):
    dictionary: DictionaryRef
    feature: int
    label: str
    scale: float = Field(description="the feature activation a multiple of 1 means: its max activation")
    scale_from: Literal["statistics", "text"]
    promoted: list[PromotedToken] = Field(description="the tokens whose probability `promoted` sums")
    promoted_from: Literal["logit_effects", "top_contexts"]
    effect: Literal["reading", "promoted"]
    text: Literal["given", "model_samples"]
    unsteered: SteerPoint
    curves: list[SteerCurve]
    best: list[SteerBest]
    winners: list[SteerWinner]
    measured_tokens: int
    generated_tokens: int
    cached: bool = Field(description="answered from the cache of this dictionary version's evaluations")
