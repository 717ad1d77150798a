"""Shared fixtures: a real server (uvicorn + grpc.aio) on loopback, and a registry with several versions."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from monosemantic.artifact import ModelRef, load_dictionary, publish
from monosemantic.client import GrpcClient, RestClient
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path


class RunningServer:
    """A service.server.Server on its own event loop in a thread, on free ports."""

    def __init__(self, **settings) -> None:
        from service.server import Server
        from service.settings import ServiceSettings

        self.server = Server(ServiceSettings(host="127.0.0.1", http_port=0, grpc_port=0, **settings))
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._started = threading.Event()
        while not self._started.wait(0.05):
            if not self.thread.is_alive():
                raise RuntimeError(f"the server did not start: {self.error!r}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            task = asyncio.create_task(self.server.serve(install_signal_handlers=False))
            started = asyncio.create_task(self.server.started.wait())
            await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                self._started.set()
            else:
                started.cancel()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by the constructor
            self.error = exc

    @property
    def engine(self):
        return self.server.engine

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(30)


ADMIN_KEY = "test-admin-key"


def wait_until_ok(url: str, timeout: float = 120.0) -> None:
    """Poll GET url until it answers 200 (a process starting up), sleeping between tries."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout:.0f} s")


def tiny_llama(directory: Path, chat_template: str | None = None) -> Path:
    """A 2-layer Llama built from its config class (seed 0) with the reference tokenizer, saved in `directory`:
    the gated MLP and RMSNorm of Llama-family models at test size; `chat_template` is given to its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(reference_lm_path())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory


def one_hot_lm_and_sae(vocab: int = 32):
    """A one-layer GPT-2 whose token embeddings are the identity and whose position embeddings are zero, read at
    blocks.0.hook_resid_pre (the activation there is exactly the token's one-hot vector), with a word-level
    tokenizer (w0 is BOS) and the dictionary W_enc = W_dec = I, b_enc = -0.5: feature i fires 0.5 on token i and
    nowhere else. Every dashboard statistic's answer is then known."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from monosemantic.lm import LoadedLM, weights_checksum
    from monosemantic.sae import SAEConfig, build_sae

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=vocab, n_layer=1, n_head=4, n_positions=64)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(vocab))
        model.transformer.wpe.weight.zero_()
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w0")
    lm = LoadedLM(model=model, tokenizer=tokenizer, source="one-hot", checksum=weights_checksum(model))
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=vocab, d_sae=vocab))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(vocab))
        sae.W_dec.copy_(torch.eye(vocab))
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    return lm, sae


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    """reference v1 (the shipped one), reference v2 (same weights, fp32), and `stranger`: a dictionary for
    another model (a different weights checksum) that no reload may accept."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    shipped = load_dictionary(root, REFERENCE_DICTIONARY, 1)
    m = shipped.manifest
    publish(root, REFERENCE_DICTIONARY, shipped.sae, model=m.model, hook=m.hook, dtype="float32", extra={"metrics": m.metrics})
    publish(root, "stranger", shipped.sae, model=ModelRef(name="another-model", checksum="0" * 64), hook=m.hook)
    return root


@pytest.fixture(scope="session")
def server(registry):
    running = RunningServer(registry=registry, dictionary="reference:1", max_text_chars=2000, max_new_tokens=64)
    yield running
    running.stop()


@pytest.fixture(params=["rest", "grpc"])
def client(request, server):
    """The same client interface over each transport: every semantic test runs on both."""
    made = RestClient(server.http_url) if request.param == "rest" else GrpcClient(server.grpc_target)
    made.transport = request.param
    yield made
    made.close()


@pytest.fixture(scope="session")
def reference_model():
    """The shipped model loaded directly, to check the service's numbers against."""
    from monosemantic.model import load_model

    return load_model(str(reference_lm_path()), "cpu")


@pytest.fixture(scope="session")
def reference_dictionary(reference_model):
    """The shipped dictionary bound to it."""
    from monosemantic.bound import load_bound

    return load_bound(reference_model, reference_registry_path(), REFERENCE_DICTIONARY, None)


@pytest.fixture(scope="session")
def planted():
    """128 known directions in 32 dimensions, about 4 active per row (trainer/synthetic.py): what a short training of
    each architecture's tests recovers."""
    from trainer.synthetic import make_sparse_data

    return make_sparse_data(120_000, d=32, n_features=128, mean_active=4.0, seed=0)


def exported_to_saelens(sae, x, out):
    """``sae`` written in SAELens's format to ``out`` and loaded by SAELens itself, after checking that SAELens encodes
    ``x`` and decodes our features as ``sae`` does (max |a − b| / max |b| ≤ 1e-4); returns SAELens's SAE."""
    import torch
    from sae_lens import SAE

    from monosemantic.interop import ExportAbout, get_format

    about = ExportAbout("d:v1", "tiny", "blocks.0.hook_mlp_out", "transformer.h.0.mlp", "output", None, 64, None)
    get_format("saelens", writing=True).write(sae, out, about)
    theirs = SAE.load_from_disk(out)
    with torch.no_grad():
        ours = sae.encode(x)
        assert float((theirs.encode(x) - ours).abs().max() / ours.abs().max()) <= 1e-4
        assert float((theirs.decode(ours) - sae.decode(ours)).abs().max() / x.abs().max()) <= 1e-4
    return theirs


def scripted_chat_model(directory: Path, answer: list[str]) -> Path:
    """A one-layer GPT-2 built from its config class whose greedy reply to any chat is ``answer``: its next token
    depends on the current one alone (one-hot embeddings, no position embeddings, attention and MLP writing
    nothing, an untied head holding the chain <|assistant|> → answer[0] → … → <|endoftext|>). Every other word is
    one unknown token. The tokens are fused on decoding, so the reply is exactly ''.join(answer). With its chat
    template it is served by /openai/v1 like any model: a real endpoint whose answers a test knows."""
    import torch
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if len(set(answer)) != len(answer):
        raise ValueError("a chain needs distinct tokens")
    words = ["<|endoftext|>", "<|assistant|>", "<unk>", *answer]
    vocab = len(words) + (-len(words)) % 4  # n_embd divisible by the heads
    words += [f"<pad{i}>" for i in range(vocab - len(words))]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=vocab, n_layer=1, n_head=4, n_positions=4096,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)).eval()
    chain = ["<|assistant|>", *answer, "<|endoftext|>"]
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(vocab))
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        head = torch.zeros(vocab, vocab)
        for i in range(vocab):  # anything else ends the reply
            head[0, i] = 20.0
        for now, then in zip(chain, chain[1:]):
            head[:, words.index(now)] = 0.0
            head[words.index(then), words.index(now)] = 40.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(directory)
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        additional_special_tokens=["<|assistant|>"])
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(directory)
    return directory


def write_explanation_run(registry: Path, name: str, run: str, explanations: dict, digest: str | None = None) -> None:
    """A run's record beside NAME v1, as `monosemantic-train explain` writes it (monosemantic/explanations.py):
    feature -> (explanation or None for an answer that did not parse, both scorers' balanced accuracy or None)."""
    from monosemantic.explanations import ExplanationRun, FeatureExplanation, RunWriter, ScoreRecord, run_path, version_digest

    dictionary = load_dictionary(registry, name, 1)
    header = ExplanationRun(run=run, dictionary=name, version=1, manifest_sha256=digest or version_digest(dictionary),
                            explainer_model=f"{run}-explainer", scorer_model=f"{run}-scorer", prompt_version="delphi-1",
                            endpoint="http://127.0.0.1:1/v1", settings={})
    score = lambda a: ScoreRecord(balanced_accuracy=a, examples=20, unparsed=0)  # noqa: E731
    writer = RunWriter(run_path(registry, name, 1, run), header)
    for feature, (text, accuracy) in explanations.items():
        scored = accuracy is not None
        writer.write(FeatureExplanation(feature=feature, explanation=text, shown=6, unparsed_answer=None if text else "noise",
                                        detection=score(accuracy) if scored else None, fuzzing=score(accuracy) if scored else None))
    writer.close()


def scripted_chat_registry(root: Path, answer: list[str]) -> tuple[Path, Path]:
    """(model directory, registry) to serve scripted_chat_model(answer) from: the service binds a dictionary to its
    model, so a random ReLU one (named ``d``, at blocks.0.hook_resid_pre) is published for it."""
    from monosemantic.artifact import HookRef
    from monosemantic.lm import load_lm, resolve_hook
    from monosemantic.sae import SAEConfig, build_sae

    lm = load_lm(scripted_chat_model(root / "model", answer))
    point = resolve_hook(lm, "blocks.0.hook_resid_pre")
    width = lm.model.config.n_embd
    publish(root / "registry", "d", build_sae(SAEConfig.build(architecture="relu", d_in=width, d_sae=2 * width), seed=0),
            model=ModelRef(name="scripted", checksum=lm.checksum),
            hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
    return root / "model", root / "registry"
