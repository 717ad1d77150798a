"""A small typed client for the monosemantic service, over REST (httpx) or gRPC, streaming included.

    from monosemantic.client import RestClient, GrpcClient
    with RestClient("http://127.0.0.1:8000") as client:
        result = client.activations(text="def f(x):", top_k=5)
        for event in client.generate_stream(prompt="def ", steering=[{"feature": 5, "mode": "clamp", "value": 10}]):
            ...  # GeneratedToken events, then one GenerateResponse

Both clients have the same methods and return the same pydantic models (monosemantic.api); failures raise
ServiceCallError with the HTTP status or gRPC code, the error kind and the message naming the field.
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Iterator

import grpc
import httpx

from monosemantic import api
from monosemantic.wire import to_message, to_model


class ServiceCallError(Exception):
    def __init__(self, status: int | str, message: str, kind: str | None = None, field: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.kind, self.field = status, message, kind, field


Event = api.GeneratedToken | api.GenerateResponse


class RestClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 ca_file: str | None = None) -> None:
        """ca_file: a PEM bundle to trust for an https:// base_url (a private CA or a self-signed server)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers, verify=verify)

    def __enter__(self) -> "RestClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                raise ServiceCallError(response.status_code, response.text[:200]) from None
            raise ServiceCallError(response.status_code, error.get("message", ""), error.get("kind"), error.get("field"))
        return response.json()

    def _post(self, path: str, body: dict, model: type[api.BaseModel]) -> Any:
        return model.model_validate(self._check(self._http.post(path, json={k: v for k, v in body.items() if v is not None})))

    def activations(self, **request: Any) -> api.ActivationsResponse:
        return self._post("/v1/activations", request, api.ActivationsResponse)

    def attributions(self, **request: Any) -> api.AttributionsResponse:
        return self._post("/v1/attributions", request, api.AttributionsResponse)

    def generate(self, **request: Any) -> api.GenerateResponse:
        return self._post("/v1/generate", {**request, "stream": False}, api.GenerateResponse)

    def generate_stream(self, **request: Any) -> Iterator[Event]:
        body = {k: v for k, v in {**request, "stream": True}.items() if v is not None}
        with self._http.stream("POST", "/v1/generate", json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
                    if name == "token":
                        yield api.GeneratedToken.model_validate(data)
                    elif name == "done":
                        yield api.GenerateResponse.model_validate(data)
                        return
                    elif name == "error":
                        error = data["error"]
                        raise ServiceCallError("stream", error.get("message", ""), error.get("kind"), error.get("field"))

    def feature(self, feature: int, dictionary: str | None = None) -> api.FeatureResponse:
        params = {"dictionary": dictionary} if dictionary is not None else {}
        return api.FeatureResponse.model_validate(self._check(self._http.get(f"/v1/features/{feature}", params=params)))

    def search_features(self, q: str, by: str = "snippet", page: int = 1, page_size: int = 20, dictionary: str | None = None,
                        of: str | None = None) -> api.SearchFeaturesResponse:
        params = {"q": q, "by": by, "page": page, "page_size": page_size,
                  **{k: v for k, v in (("dictionary", dictionary), ("of", of)) if v is not None}}
        return api.SearchFeaturesResponse.model_validate(self._check(self._http.get("/v1/features/search", params=params)))

    def steer_eval(self, feature: int, **request: Any) -> api.SteerEvalResponse:
        return api.SteerEvalResponse.model_validate(self._check(self._http.post("/v1/steer-eval", json={"feature": feature, **request})))

    def list_features(self, **request: Any) -> api.ListFeaturesResponse:
        params = {k: v for k, v in request.items() if v is not None}
        return api.ListFeaturesResponse.model_validate(self._check(self._http.get("/v1/features", params=params)))

    def observe(self, texts: list[str], **request: Any) -> api.ObserveResponse:
        return self._post("/v1/observe", {"texts": texts, **request}, api.ObserveResponse)

    def dictionaries(self) -> api.DictionariesResponse:
        return api.DictionariesResponse.model_validate(self._check(self._http.get("/v1/dictionaries")))

    def reload(self, name: str, version: int | None = None) -> api.ReloadResponse:
        return self._post("/v1/admin/reload", {"name": name, "version": version}, api.ReloadResponse)

    def unload(self, name: str) -> api.UnloadResponse:
        return self._post("/v1/admin/unload", {"name": name}, api.UnloadResponse)

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200


def _grpc_error(exc: grpc.RpcError) -> ServiceCallError:
    trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    return ServiceCallError(exc.code().name, exc.details() or "", trailing.get("error-kind"), trailing.get("error-field"))


class GrpcClient:
    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, timeout: float = 60.0,
                 ca_file: str | None = None) -> None:
        """ca_file: a PEM bundle to trust; given, the channel uses TLS."""
        from monosemantic.v1 import feature_service_pb2 as pb
        from monosemantic.v1 import feature_service_pb2_grpc as pb_grpc

        self._pb = pb
        if ca_file:
            with open(ca_file, "rb") as fh:
                self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=fh.read()))
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any, request_type: str, response_model: type[api.BaseModel], timeout: float | None = None) -> Any:
        message = to_message(request, getattr(self._pb, request_type))
        try:
            reply = getattr(self._stub, method)(message, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        return to_model(reply, response_model)

    def activations(self, timeout: float | None = None, **request: Any) -> api.ActivationsResponse:
        return self._call("Activations", request, "ActivationsRequest", api.ActivationsResponse, timeout)

    def attributions(self, timeout: float | None = None, **request: Any) -> api.AttributionsResponse:
        return self._call("Attributions", request, "AttributionsRequest", api.AttributionsResponse, timeout)

    def generate(self, timeout: float | None = None, **request: Any) -> api.GenerateResponse:
        return self._call("Generate", request, "GenerateRequest", api.GenerateResponse, timeout)

    def generate_stream(self, timeout: float | None = None, **request: Any) -> Iterator[Event]:
        message = to_message(request, self._pb.GenerateRequest)
        call = self._stub.GenerateStream(message, timeout=timeout or self._timeout, metadata=self._metadata)
        try:
            for event in call:
                if event.HasField("token"):
                    yield to_model(event.token, api.GeneratedToken)
                else:
                    yield to_model(event.done, api.GenerateResponse)
                    return
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        finally:
            call.cancel()  # leaving the loop early cancels the stream on the server

    def feature(self, feature: int, dictionary: str | None = None) -> api.FeatureResponse:
        return self._call("GetFeature", {"feature": feature, "dictionary": dictionary}, "GetFeatureRequest", api.FeatureResponse)

    def search_features(self, q: str, by: str = "snippet", page: int = 1, page_size: int = 20, dictionary: str | None = None,
                        of: str | None = None) -> api.SearchFeaturesResponse:
        request = {"q": q, "by": by, "page": page, "page_size": page_size, "dictionary": dictionary, "of": of}
        return self._call("SearchFeatures", request, "SearchFeaturesRequest", api.SearchFeaturesResponse)

    def steer_eval(self, feature: int, **request: Any) -> api.SteerEvalResponse:
        return self._call("SteerEval", {"feature": feature, **request}, "SteerEvalRequest", api.SteerEvalResponse)

    def list_features(self, **request: Any) -> api.ListFeaturesResponse:
        return self._call("ListFeatures", request, "ListFeaturesRequest", api.ListFeaturesResponse)

    def observe(self, texts: list[str], **request: Any) -> api.ObserveResponse:
        return self._call("Observe", {"texts": texts, **request}, "ObserveRequest", api.ObserveResponse)

    def dictionaries(self) -> api.DictionariesResponse:
        return self._call("ListDictionaries", {}, "ListDictionariesRequest", api.DictionariesResponse)

    def reload(self, name: str, version: int | None = None) -> api.ReloadResponse:
        return self._call("Reload", {"name": name, "version": version}, "ReloadRequest", api.ReloadResponse)

    def unload(self, name: str) -> api.UnloadResponse:
        return self._call("Unload", {"name": name}, "UnloadRequest", api.UnloadResponse)
