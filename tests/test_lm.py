"""Specifications for monosemantic.lm: loading, hook-point names, reading and replacing activations.

Every model here is a real transformers architecture built locally from a tiny config; nothing touches the hub.
"""

from __future__ import annotations

import copy
import os
import socket
from functools import lru_cache
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub call must fail loudly, not hang

import pytest
import torch
from torch import nn
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from monosemantic.errors import HookError, ModelLoadError, MonosemanticError
from monosemantic.lm import (
    HookPoint,
    LoadedLM,
    hook_dim,
    hooked_replacement,
    load_lm,
    logits_with_replacement,
    read_activations,
    linear_to_logits,
    resolve_hook,
    weights_checksum,
)

VOCAB = 100
D_MODEL = 32
N_LAYERS = 2
D_MLP = {"gpt2": 64, "gpt_neox": 64, "llama": 48, "qwen2": 48, "mistral": 48}
FAMILIES = list(D_MLP)
LLAMA_STYLE = ["llama", "qwen2", "mistral"]

# What each alias must mean, written out per family (not derived from the implementation's table).
EXPECTED = {
    "gpt2": {
        "mlp.hook_post": ("transformer.h.{L}.mlp.act", "output"),
        "mlp.hook_pre": ("transformer.h.{L}.mlp.c_fc", "output"),
        "hook_resid_pre": ("transformer.h.{L}", "input"),
        "hook_resid_post": ("transformer.h.{L}", "output"),
        "hook_mlp_out": ("transformer.h.{L}.mlp", "output"),
    },
    "gpt_neox": {
        "mlp.hook_post": ("gpt_neox.layers.{L}.mlp.act", "output"),
        "mlp.hook_pre": ("gpt_neox.layers.{L}.mlp.dense_h_to_4h", "output"),
        "hook_resid_pre": ("gpt_neox.layers.{L}", "input"),
        "hook_resid_post": ("gpt_neox.layers.{L}", "output"),
        "hook_mlp_out": ("gpt_neox.layers.{L}.mlp", "output"),
    },
    **{
        family: {
            "mlp.hook_post": ("model.layers.{L}.mlp.down_proj", "input"),
            "mlp.hook_pre": ("model.layers.{L}.mlp.gate_proj", "output"),
            "hook_resid_pre": ("model.layers.{L}", "input"),
            "hook_resid_post": ("model.layers.{L}", "output"),
            "hook_mlp_out": ("model.layers.{L}.mlp", "output"),
        }
        for family in LLAMA_STYLE
    },
}
ALIASES = list(EXPECTED["gpt2"])
WIDTH = {"mlp.hook_post": "mlp", "mlp.hook_pre": "mlp", "hook_resid_pre": "model", "hook_resid_post": "model", "hook_mlp_out": "model"}


@lru_cache(maxsize=None)
def tiny(family: str) -> nn.Module:
    """A seeded two-layer model of the family, in eval mode; shared, so tests must not change its weights."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, max_position_embeddings=64)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=2, n_inner=64,
            activation_function="relu", bos_token_id=1, eos_token_id=1,
        )
        model = GPT2LMHeadModel(config)
    elif family == "gpt_neox":
        config = GPTNeoXConfig(
            hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=2, intermediate_size=64, **common
        )
        model = GPTNeoXForCausalLM(config)
    else:
        config_cls, model_cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
        }[family]
        config = config_cls(
            hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=N_LAYERS, num_attention_heads=2,
            num_key_value_heads=1, **common,
        )
        model = model_cls(config)
    return model.eval()


def tokens(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0".."w97" plus <unk> and <eos>, with no pad token."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def capture_output(module: nn.Module, store: list):
    return module.register_forward_hook(lambda _m, _a, out: store.append(out[0] if isinstance(out, tuple) else out))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls are ~100x slower with two OpenMP threads on a busy two-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once."""

    def refuse(*_args, **_kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def saved_gpt2(tmp_path):
    """The tiny GPT-2 and its tokenizer written with save_pretrained into a local folder."""
    folder = tmp_path / "tiny-gpt2"
    tiny("gpt2").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ hook names


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_alias_resolves_to_the_family_module(family, alias):
    path, kind = EXPECTED[family][alias]
    assert resolve_hook(tiny(family), f"blocks.1.{alias}") == HookPoint(path.format(L=1), f"blocks.1.{alias}", kind)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_alias_activation_has_the_expected_width(family, alias):
    width = D_MLP[family] if WIDTH[alias] == "mlp" else D_MODEL
    assert hook_dim(tiny(family), f"blocks.0.{alias}") == width
    assert read_activations(tiny(family), tokens(), f"blocks.0.{alias}").shape == (2, 5, width)


def test_hf_module_path_gets_its_alias_filled():
    assert resolve_hook(tiny("gpt2"), "transformer.h.0.mlp.act").alias == "blocks.0.mlp.hook_post"
    assert resolve_hook(tiny("llama"), "model.layers.1:input").alias == "blocks.1.hook_resid_pre"
    assert resolve_hook(tiny("llama"), "model.layers.0.mlp.down_proj:input").alias == "blocks.0.mlp.hook_post"


def test_module_output_without_an_alias_resolves_with_no_alias():
    # The output of a gated MLP's down_proj is not its neurons; it must not be mistaken for hook_post.
    assert resolve_hook(tiny("llama"), "model.layers.0.mlp.down_proj") == HookPoint(
        "model.layers.0.mlp.down_proj", None, "output"
    )
    assert resolve_hook(tiny("gpt2"), "transformer.h.0.ln_2") == HookPoint("transformer.h.0.ln_2", None, "output")


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_key_resolves_back_to_the_same_hook_point(family):
    for alias in ALIASES:
        point = resolve_hook(tiny(family), f"blocks.1.{alias}")
        assert resolve_hook(tiny(family), point.key) == point
        assert point.name == point.alias


def test_misspelt_alias_raises_hook_error_suggesting_the_nearest_names():
    with pytest.raises(HookError) as caught:
        resolve_hook(tiny("gpt2"), "blocks.0.mlp.hook_pots")
    assert "blocks.0.mlp.hook_post" in str(caught.value)


def test_misspelt_module_path_raises_hook_error_suggesting_the_nearest_names():
    with pytest.raises(HookError) as caught:
        resolve_hook(tiny("gpt2"), "transformer.h.0.mlp.ack")
    assert "transformer.h.0.mlp.act" in str(caught.value)


def test_alias_beyond_the_last_layer_raises_hook_error():
    with pytest.raises(HookError, match="out of range"):
        resolve_hook(tiny("llama"), f"blocks.{N_LAYERS}.mlp.hook_post")


def test_unknown_hook_raises_before_any_forward():
    with pytest.raises(HookError):
        read_activations(tiny("gpt2"), tokens(), "blocks.0.nothing")


# ------------------------------------------------------------------------------------------ reading activations


def test_gpt2_hook_post_equals_relu_of_c_fc_of_ln_2():
    model, ln_2_out = tiny("gpt2"), []
    handle = capture_output(model.transformer.h[0].ln_2, ln_2_out)
    try:
        with torch.no_grad():
            model(tokens())
    finally:
        handle.remove()
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        expected = torch.relu(mlp.c_fc(ln_2_out[0]))
    torch.testing.assert_close(read_activations(model, tokens(), "blocks.0.mlp.hook_post"), expected)


def test_neox_hook_post_equals_act_of_dense_h_to_4h():
    model, ln_out = tiny("gpt_neox"), []
    handle = capture_output(model.gpt_neox.layers[1].post_attention_layernorm, ln_out)
    try:
        with torch.no_grad():
            model(tokens())
    finally:
        handle.remove()
    mlp = model.gpt_neox.layers[1].mlp
    with torch.no_grad():
        expected = mlp.act(mlp.dense_h_to_4h(ln_out[0]))
    torch.testing.assert_close(read_activations(model, tokens(), "blocks.1.mlp.hook_post"), expected)


@pytest.mark.parametrize("family", LLAMA_STYLE)
def test_llama_style_hook_post_is_the_gated_product_not_the_act_fn_output(family):
    model, ln_out, act_out = tiny(family), [], []
    layer = model.model.layers[0]
    handles = [capture_output(layer.post_attention_layernorm, ln_out), capture_output(layer.mlp.act_fn, act_out)]
    try:
        with torch.no_grad():
            model(tokens())
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        expected = layer.mlp.act_fn(layer.mlp.gate_proj(ln_out[0])) * layer.mlp.up_proj(ln_out[0])
    got = read_activations(model, tokens(), "blocks.0.mlp.hook_post")
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, act_out[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_of_a_layer_equals_resid_post_of_the_layer_before(family):
    post = read_activations(tiny(family), tokens(), "blocks.0.hook_resid_post")
    assert torch.equal(read_activations(tiny(family), tokens(), "blocks.1.hook_resid_pre"), post)


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_equals_hf_hidden_states_entry_of_that_layer(family):
    with torch.no_grad():
        hidden = tiny(family)(tokens(), output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        torch.testing.assert_close(read_activations(tiny(family), tokens(), f"blocks.{layer}.hook_resid_pre"), hidden[layer])


def test_gpt2_last_resid_post_is_taken_before_the_final_layer_norm():
    model = tiny("gpt2")
    with torch.no_grad():
        last_hidden = model(tokens(), output_hidden_states=True).hidden_states[-1]
        resid_post = read_activations(model, tokens(), f"blocks.{N_LAYERS - 1}.hook_resid_post")
        torch.testing.assert_close(model.transformer.ln_f(resid_post), last_hidden)
    assert not torch.allclose(resid_post, last_hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_at_hook_gives_the_same_activation_as_a_full_forward(family):
    stopped = read_activations(tiny(family), tokens(), "blocks.0.mlp.hook_post", stop_at_hook=True)
    full = read_activations(tiny(family), tokens(), "blocks.0.mlp.hook_post", stop_at_hook=False)
    assert torch.equal(stopped, full)


def test_stop_at_hook_does_not_run_later_layers_or_the_unembedding():
    model, calls = tiny("gpt2"), []
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in [("lm_head", model.lm_head), ("last", model.transformer.h[-1])]
    ]
    try:
        read_activations(model, tokens(), "blocks.0.mlp.hook_post", stop_at_hook=True)
        assert calls == []
        read_activations(model, tokens(), "blocks.0.mlp.hook_post", stop_at_hook=False)
        assert sorted(calls) == ["last", "lm_head"]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("stop", [True, False])
def test_read_activations_leaves_no_hook_behind(stop):
    model = tiny("llama")
    before = hook_counts(model)
    read_activations(model, tokens(), "blocks.0.mlp.hook_post", stop_at_hook=stop)
    read_activations(model, tokens(), "blocks.1.hook_resid_pre", stop_at_hook=stop)
    assert hook_counts(model) == before


def test_read_activations_result_can_feed_a_module_that_needs_gradients():
    # An inference-mode tensor would fail here ("Inference tensors cannot be saved for backward").
    acts = read_activations(tiny("gpt2"), tokens(), "blocks.0.mlp.hook_post")
    encoder = nn.Linear(acts.shape[-1], 8)
    encoder(acts).pow(2).sum().backward()
    assert encoder.weight.grad is not None


def test_right_padding_leaves_activations_at_real_positions_unchanged():
    model, ids = tiny("gpt2"), tokens(batch=1, seq=4)
    padded = torch.cat([ids, torch.zeros((1, 2), dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    alone = read_activations(model, ids, "blocks.1.hook_resid_post")
    batched = read_activations(model, padded, "blocks.1.hook_resid_post", attention_mask=mask)
    torch.testing.assert_close(batched[:, :4], alone, rtol=1e-5, atol=1e-5)


def test_loaded_lm_is_accepted_wherever_a_model_is():
    lm = LoadedLM(model=tiny("gpt2"), tokenizer=tiny_tokenizer(), source="memory", checksum="")
    assert hook_dim(lm, "blocks.0.mlp.hook_post") == D_MLP["gpt2"]
    assert resolve_hook(lm, "blocks.0.mlp.hook_post").module_path == "transformer.h.0.mlp.act"


# -------------------------------------------------------------------------------------- replacing activations


@pytest.mark.parametrize("alias", ["mlp.hook_post", "hook_resid_pre", "hook_resid_post", "hook_attn_out"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_replacement_leaves_logits_unchanged(family, alias):
    model = tiny(family)
    with torch.no_grad():
        reference = model(tokens()).logits
        spliced = logits_with_replacement(model, tokens(), f"blocks.0.{alias}", lambda x: x)
    assert torch.equal(spliced, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_hook_post_changes_logits(family):
    model = tiny(family)
    with torch.no_grad():
        reference = model(tokens()).logits
        zeroed = logits_with_replacement(model, tokens(), "blocks.0.mlp.hook_post", torch.zeros_like)
    assert not torch.allclose(zeroed, reference)


def test_replacement_hook_is_removed_after_the_context():
    model = tiny("gpt2")
    with torch.no_grad():
        reference = model(tokens()).logits
    before = hook_counts(model)
    with hooked_replacement(model, "blocks.0.mlp.hook_post", torch.zeros_like):
        assert hook_counts(model) != before
    assert hook_counts(model) == before
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference)


def test_replacement_hook_is_removed_when_the_body_raises():
    model = tiny("llama")
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked_replacement(model, "blocks.0.mlp.hook_post", torch.zeros_like):
            raise RuntimeError("boom")
    assert hook_counts(model) == before


def test_replacement_hook_is_removed_when_fn_raises_mid_forward():
    model = tiny("gpt2")
    before = hook_counts(model)

    def failing(_x):
        raise ValueError("bad fn")

    with pytest.raises(ValueError, match="bad fn"):
        logits_with_replacement(model, tokens(), "blocks.0.hook_resid_post", failing)
    assert hook_counts(model) == before


def test_replacement_passes_gradients_through_fn():
    model = tiny("gpt2")
    scale = torch.ones(D_MLP["gpt2"], requires_grad=True)
    logits = logits_with_replacement(model, tokens(), "blocks.0.mlp.hook_post", lambda x: x * scale)
    logits[:, -1].sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_replacement_of_the_wrong_shape_raises():
    with pytest.raises(MonosemanticError, match="shape"):
        logits_with_replacement(tiny("gpt2"), tokens(), "blocks.0.mlp.hook_post", lambda x: x[..., :3])


def test_replacement_is_cast_back_to_the_activation_dtype():
    model = tiny("gpt2")
    with torch.no_grad():
        reference = model(tokens()).logits
        spliced = logits_with_replacement(model, tokens(), "blocks.0.hook_resid_post", lambda x: x.double())
    assert spliced.dtype == reference.dtype
    torch.testing.assert_close(spliced, reference)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replacement_under_generate_sees_only_new_positions_and_steers_the_output(family):
    model, prompt, new = tiny(family), tokens(batch=1, seq=3), 4
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        baseline = model.generate(prompt, **settings)[0, 3:].tolist()
    # Push the final residual stream hard toward one token's unembedding: greedy decoding must then pick it.
    target = next(t for t in range(2, VOCAB) if t not in baseline)
    direction = model.get_output_embeddings().weight[target].detach() * 1000
    shapes = []

    def steer(x):
        shapes.append(tuple(x.shape))
        return x + direction

    with torch.no_grad(), hooked_replacement(model, f"blocks.{N_LAYERS - 1}.hook_resid_post", steer):
        steered = model.generate(prompt, **settings)[0, 3:].tolist()
    assert steered == [target] * new != baseline
    assert shapes[0] == (1, 3, D_MODEL) and set(shapes[1:]) == {(1, 1, D_MODEL)}


class _KeywordBlock(nn.Module):
    """A block called with hidden_states by keyword that returns a tuple, as transformers layers may."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.proj(hidden_states), "extra"


class _KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.block = _KeywordBlock()
        self.seen_extra = None

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        out, self.seen_extra = self.block(hidden_states=self.embed(input_ids))
        return SimpleNamespace(logits=out)


def test_input_hook_sees_and_replaces_hidden_states_passed_by_keyword():
    model, ids = _KeywordModel(), torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(read_activations(model, ids, "block:input"), model.embed(ids))
        logits = logits_with_replacement(model, ids, "block:input", torch.zeros_like)
        assert torch.equal(logits, model.block.proj(torch.zeros(1, 3, 4)))


def test_output_hook_replaces_element_zero_of_a_tuple_and_keeps_the_rest():
    model, ids = _KeywordModel(), torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = logits_with_replacement(model, ids, "block", torch.zeros_like)
    assert torch.equal(logits, torch.zeros(1, 3, 4)) and model.seen_extra == "extra"


# ------------------------------------------------------------------------------------------------------ loading


def test_load_lm_from_a_local_directory_works_offline(saved_gpt2, no_network):
    lm = load_lm(saved_gpt2)
    assert not lm.model.training
    assert lm.source == str(saved_gpt2)
    with torch.no_grad():
        assert torch.equal(lm.model(tokens()).logits, tiny("gpt2")(tokens()).logits)


def test_load_lm_checksum_equals_that_of_the_original_module(saved_gpt2, no_network):
    assert load_lm(saved_gpt2).checksum == weights_checksum(tiny("gpt2"))


def test_weights_checksum_of_a_directory_equals_that_of_the_module(saved_gpt2, no_network):
    assert weights_checksum(saved_gpt2) == weights_checksum(tiny("gpt2"))


def test_weights_checksum_changes_when_a_weight_changes():
    changed = copy.deepcopy(tiny("gpt2"))
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    assert weights_checksum(changed) != weights_checksum(tiny("gpt2"))


def test_load_lm_gives_a_tokenizer_without_pad_token_the_eos_token(saved_gpt2, no_network):
    assert tiny_tokenizer().pad_token is None
    assert load_lm(saved_gpt2).tokenizer.pad_token == "<eos>"


def test_load_lm_uses_the_requested_dtype(saved_gpt2, no_network):
    assert next(load_lm(saved_gpt2, dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16


def test_missing_directory_raises_model_load_error_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_lm(missing)
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_lm(str(missing))


def test_corrupt_weights_raise_model_load_error(saved_gpt2, no_network):
    (saved_gpt2 / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=str(saved_gpt2)):
        load_lm(saved_gpt2)


def test_directory_without_config_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_lm(tmp_path)


def test_gemma_2s_attention_and_mlp_outputs_are_read_after_their_post_norms_as_transformerlens_names_them():
    # TL's Gemma 2 hook_mlp_out / hook_attn_out follow ln2_post / ln1_post; Gemma Scope's dictionaries read them there.
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    found = {name: resolve_hook(model, name) for name in ("blocks.1.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.0.mlp.hook_post")}
    assert {n: (p.module_path, p.kind) for n, p in found.items()} == {
        "blocks.1.hook_mlp_out": ("model.layers.1.post_feedforward_layernorm", "output"),
        "blocks.0.hook_attn_out": ("model.layers.0.post_attention_layernorm", "output"),
        "blocks.0.mlp.hook_post": ("model.layers.0.mlp.down_proj", "input"),
    }
    assert not linear_to_logits(model, "blocks.1.hook_mlp_out")  # post-norm and soft-capped logits: no direct path claimed


@pytest.mark.parametrize("family, alias, width", [("gpt2", "mlp.hook_post", 64), ("gpt2", "hook_resid_post", D_MODEL),
                                                 ("llama", "hook_mlp_out", D_MODEL)])
def test_logit_extremes_in_chunks_are_the_top_k_of_the_whole_matrix(family, alias, width):
    from monosemantic.lm import direct_logit_effects, direct_logit_extremes

    model, hook = tiny(family), f"blocks.{N_LAYERS - 1}.{alias}"
    directions = torch.randn(37, width, generator=torch.Generator().manual_seed(3))
    dense = direct_logit_effects(model, hook, directions)
    chunked = direct_logit_extremes(model, hook, directions, k=5, chunk_bytes=4 * VOCAB * 8)  # 8 directions a chunk
    up, down = dense.topk(5, dim=-1), dense.topk(5, dim=-1, largest=False)
    assert torch.equal(chunked.up_ids, up.indices) and torch.allclose(chunked.up_values, up.values)
    assert torch.equal(chunked.down_ids, down.indices) and torch.allclose(chunked.down_values, down.values)


def test_logit_extremes_are_none_where_there_is_no_direct_path():
    from monosemantic.lm import direct_logit_extremes

    assert direct_logit_extremes(tiny("gpt2"), "blocks.0.mlp.hook_pre", torch.randn(3, 64), k=2) is None
