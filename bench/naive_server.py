"""The naive baseline for bench/serve.py: the HF model and the SAE called per request inside a plain FastAPI
handler, the way most research servers do it (full forward, fp32, no batching, pydantic response model).

    python bench/naive_server.py PORT [--model M] [--registry R] [--dictionary NAME[:VERSION]] [--hook H]

Defaults: MONOSEMANTIC_MODEL / _REGISTRY / _DICTIONARY as the service reads them (bench/serve.py passes both servers
the same environment), else the shipped reference; the model the dictionary records and the hook it was trained at.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from monosemantic.artifact import load_dictionary, parse_reference, recorded_model_source
from monosemantic.lm import load_lm, resolve_hook
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("port", type=int)
parser.add_argument("--model", default=os.environ.get("MONOSEMANTIC_MODEL"))
parser.add_argument("--registry", default=os.environ.get("MONOSEMANTIC_REGISTRY") or str(reference_registry_path()))
parser.add_argument("--dictionary", default=os.environ.get("MONOSEMANTIC_DICTIONARY") or REFERENCE_DICTIONARY)
parser.add_argument("--hook", help="default: the dictionary's")
args = parser.parse_args()
name, version = parse_reference(args.dictionary)
registry = Path(args.registry)
lm = load_lm(args.model or recorded_model_source(registry, name, version) or reference_lm_path())
dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
sae = dictionary.sae.float()
point = resolve_hook(lm.model, args.hook or f"{dictionary.manifest.hook.module_path}:{dictionary.manifest.hook.kind}")
if point.kind != "output":
    raise SystemExit(f"the naive baseline reads module outputs only, not {point.name}")
module = lm.model.get_submodule(point.module_path)
app = FastAPI()


class Request(BaseModel):
    text: str
    top_k: int = 10


class Feature(BaseModel):
    feature: int
    value: float


class Token(BaseModel):
    id: int
    text: str
    top: list[Feature]


class Response(BaseModel):
    tokens: list[Token]


@app.post("/v1/activations", response_model=Response)
async def activations(req: Request) -> Response:
    ids = lm.tokenizer(lm.tokenizer.bos_token + req.text, return_tensors="pt").input_ids
    captured = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
            features = sae.encode(captured[0][0])
    finally:
        handle.remove()
    values, indices = features.topk(req.top_k, dim=-1)
    tokens = [
        Token(id=int(t), text=lm.tokenizer.decode([int(t)]), top=[Feature(feature=int(i), value=float(v)) for i, v in zip(indices[n], values[n]) if v > 0])
        for n, t in enumerate(ids[0])
    ]
    return Response(tokens=tokens)


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
