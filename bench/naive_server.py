"""The naive baseline for bench/serve.py: the HF model and the SAE called per request inside a plain FastAPI
handler, the way most research servers do it (full forward, fp32, no batching, pydantic response model).

    python bench/naive_server.py PORT
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from monosemantic.artifact import load_dictionary
from monosemantic.lm import load_lm, resolve_hook
from monosemantic.shipped import REFERENCE_DICTIONARY, REFERENCE_HOOK, reference_lm_path, reference_registry_path

lm = load_lm(reference_lm_path())
sae = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY).sae.float()
module = lm.model.get_submodule(resolve_hook(lm.model, REFERENCE_HOOK).module_path)
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
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
