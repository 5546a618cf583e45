"""The FastAPI app of a replica: routes, API key, body-size limit, CORS, errors as JSON.

Built inside each replica by ``Classifier.__serve_build_asgi_app__`` (``rayfine.serve.app``), with
the replica as ``server``: routes read ``server.model`` (the model swapped in by ``reconfigure``)
once, check the request against it and call ``server.infer(items, model)``, which runs it on that
model even if a swap lands meanwhile (dynamic batching: rayfine.serve.batching).

Every refused request gets a 4xx and ``{"error": "..."}``, the error object of the Open Inference
Protocol, on every route: an unknown route or method, a missing or wrong API key (401), a body over
serve.max_request_bytes (413, before it is parsed; for a gzip or deflate body, decompressed too), a
wrong Content-Type or Content-Encoding (415), malformed JSON, bad tensors or a corrupt compressed
body (400), an unknown model name or version (404). A request for the model before it is loaded gets
503, and a failure of rayfine's own 500, both with the same error object.

Inference follows the Open Inference Protocol (KServe v2) with JSON tensors and Triton's binary
tensor data extension, so that its clients work as they are: tritonclient sends JSON requests with
no Content-Type and, by default, tensors and answers as binary data.

The API key guards every route but the health routes and the OpenAPI pages (/docs, /redoc, /openapi.json,
which declares the key's two schemes for Swagger UI's "Authorize"). With serve.cors_origins,
Starlette's CORS middleware sits outside the key: browsers' preflights carry no credentials.
"""

from __future__ import annotations

import functools
import gzip
import hmac
import json
import zlib
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from rayfine.serve import protocol
from rayfine.serve.protocol import RequestError

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
# Open to all: the routes and schemas, which the README documents anyway, so that /docs works in a browser.
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
OPEN_PATHS = HEALTH_PATHS + DOCS_PATHS  # the routes that need no API key
JSON = "application/json"
MULTIPART = "multipart/form-data"
BINARY = "application/octet-stream"  # a v2 body with binary tensor data
DECODED_CODINGS = "gzip, deflate"  # the request Content-Encodings BodyDecoder reads (x-gzip is gzip)
# The request headers the API reads, which a browser script may send (CORS).
CORS_HEADERS = ("Authorization", "X-API-Key", "Content-Type", "Content-Encoding", "Inference-Header-Content-Length",
                "Accept-Encoding")
STATS_SUMMARY = "Model statistics (Triton's statistics extension), of the replica that answers"
# The refusals the OpenAPI schema declares ({"error": "..."}), by status.
ERRORS = {
    400: "Malformed JSON, bad tensors or inputs, a limit exceeded, a corrupt compressed body",
    401: "Missing or wrong API key",
    404: "Unknown model name or version",
    413: "Body over serve.max_request_bytes (decompressed too)",
    415: "Content-Type or Content-Encoding not accepted, or an image format outside serve.image_formats",
    503: "The model is not loaded yet",
}


def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, decompressed: bool = False):
        what = "decompressed request body" if decompressed else "request body"
        super().__init__(413, f"{what} exceeds the limit of {limit} bytes (serve.max_request_bytes)")


class BadBody(HTTPException):
    def __init__(self, message: str):
        super().__init__(400, message)


def response_coding(accept: Optional[str]) -> Optional[str]:
    """gzip (else deflate) when the Accept-Encoding header accepts it (q > 0), else None."""
    weights = {}
    for part in (accept or "").split(","):
        coding, *params = [p.strip() for p in part.split(";")]
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if coding:
            weights[coding.lower()] = weight
    for coding in ("gzip", "deflate"):
        if weights.get(coding, weights.get("*", 0.0)) > 0:
            return coding
    return None


def compress(data: bytes, coding: str) -> bytes:
    """gzip, or deflate as RFC 9110 defines it (zlib's format, as tritonclient reads it)."""
    return gzip.compress(data, compresslevel=6) if coding == "gzip" else zlib.compress(data, 6)


class BodyDecoder:
    """Decompresses a request body as it arrives (Content-Encoding gzip, or deflate: zlib's format
    as RFC 9110 defines it, or raw deflate as some clients send it), and refuses more than
    ``limit`` bytes once decompressed: a small compressed body cannot become a large one here."""

    CODINGS = ("gzip", "x-gzip", "deflate")

    def __init__(self, coding: str, limit: int):
        self.coding, self.limit, self.size, self.start = coding, limit, 0, b""
        self.gzip = "gzip" in coding
        self.members = 1  # gzip members begun
        self.inflate: Optional[Any] = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzip else None

    def feed(self, chunk: bytes, last: bool) -> bytes:
        if self.inflate is None:  # deflate: a zlib header (RFC 1950) or raw deflate data; look at 2 bytes
            chunk, self.start = self.start + chunk, b""
            if len(chunk) < 2 and not last:
                self.start = chunk
                return b""
            zlib_header = len(chunk) >= 2 and chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
            self.inflate = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        out = []
        while chunk:
            if self.inflate.eof:
                # A gzip body is a series of members (RFC 1952 2.2), as `cat a.gz b.gz` or a
                # streaming compressor makes it; a zlib or raw deflate stream is one, then nothing.
                if not self.gzip:
                    raise BadBody(f"the body has data after the end of its {self.coding} stream")
                self.inflate, self.members = zlib.decompressobj(16 + zlib.MAX_WBITS), self.members + 1
            try:
                piece = self.inflate.decompress(chunk, self.limit - self.size + 1)
            except zlib.error as e:
                if self.members > 1:
                    raise BadBody(f"the body's data after gzip member {self.members - 1} is not a gzip member ({e})") from None
                raise BadBody(f"the body is not valid {self.coding} data ({e})") from None
            self.size += len(piece)  # over every member: the limit is on the whole body
            if self.size > self.limit or self.inflate.unconsumed_tail:
                raise BodyTooLarge(self.limit, decompressed=True)
            out.append(piece)
            chunk = self.inflate.unused_data
        if last and not self.inflate.eof:
            raise BadBody(f"the body ends before its {self.coding} data does (truncated)")
        return b"".join(out)


def errors(*codes: int) -> dict:
    """``responses`` of a route: the refusals it can give, each an ErrorResponse."""
    return {code: {"model": protocol.ErrorResponse, "description": ERRORS[code]} for code in codes}


class CORS(CORSMiddleware):
    """Starlette's CORS (serve.cors_origins), outside the API key: a browser's preflight carries no
    credentials (Fetch standard). A refused preflight is answered {"error": ...} like every refusal."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        return error(response.status_code, f"CORS preflight refused: {response.body.decode()} "
                     "(serve.cors_origins lists the origins allowed)", {"Vary": response.headers["vary"]})


def _without_body(send):
    """``send`` for a HEAD request: the GET answer's status and headers (Content-Length included), no body."""

    async def head_send(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return head_send


class Guard:
    """ASGI middleware in front of every route: one trailing slash dropped from the path, the API
    key, then the body-size limit, which it enforces on Content-Length and on the bytes actually
    received (chunked bodies too), and the body's Content-Encoding: gzip and deflate bodies reach
    the routes decompressed, within the same limit."""

    def __init__(self, app, server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "HEAD":
            # HEAD is GET without the body (RFC 9110 9.3.2): health checkers and load balancers
            # send it; FastAPI's routes answer GET only.
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path, root = scope.get("path", "/"), scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path
        if route.endswith("/") and route != "/":
            # /v2/health/ready/ is /v2/health/ready: for the key check and the router (no redirect).
            route, raw = route[:-1], scope.get("raw_path")
            scope = {**scope, "path": path[:-1], "raw_path": raw[:-1] if raw and raw.endswith(b"/") else raw}
        key: Optional[bytes] = self.server.api_key
        if key is not None and route not in OPEN_PATHS:
            auth = headers.get("authorization", b"")
            # Either header may carry the key, as the OpenAPI schema declares them alternatives: a
            # gateway's own X-API-Key does not hide the client's bearer token. An empty X-API-Key (a
            # client template's unset variable) is no key, not a wrong one.
            given = [v for v in (headers.get("x-api-key", b"").strip(),
                                 auth[7:].strip() if auth[:7].lower() == b"bearer " else b"") if v]
            if not given:
                return await error(401, "missing API key: send the header 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                                   {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            if not any([hmac.compare_digest(v, key) for v in given]):  # noqa: C419 - a list: both compared
                return await error(401, "invalid API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})(scope, receive, send)
        limit = self.server.settings.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await error(400, "Content-Length is not a number")(scope, receive, send)
            if too_big:
                return await error(413, BodyTooLarge(limit).detail)(scope, receive, send)
        coding = headers.get("content-encoding", b"identity").decode("latin-1").strip().lower()
        decoder = None
        if coding not in ("identity", ""):
            if coding not in BodyDecoder.CODINGS:
                # RFC 9110 15.5.16: a 415 for a content coding names the accepted ones in Accept-Encoding.
                return await error(415, f"Content-Encoding {coding} is not accepted; accepted: {DECODED_CODINGS}, "
                                   "identity", {"Accept-Encoding": DECODED_CODINGS})(scope, receive, send)
            decoder = BodyDecoder(coding, limit)
            # The routes see the decompressed body, so its encoding and wire length are gone.
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", [])
                                          if k.lower() not in (b"content-encoding", b"content-length")]}
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if received > limit:
                    raise BodyTooLarge(limit)
                if decoder is not None:
                    message = {**message, "body": decoder.feed(body, last=not message.get("more_body", False))}
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BadBody) as e:
            if not started:
                await error(e.status_code, e.detail)(scope, receive, send)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _require(request: Request, *allowed: str) -> str:
    ctype = _content_type(request)
    if ctype not in allowed:
        raise RequestError(f"Content-Type must be {' or '.join(allowed)}, got {ctype or 'none'}", status=415)
    return ctype


def _schema_ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def make_api(server) -> FastAPI:
    """The HTTP API of one replica; ``server`` is the Classifier replica."""
    from rayfine import __version__

    app = FastAPI(
        title=f"rayfine: {server.name}",
        version=__version__,
        description="Open Inference Protocol (KServe v2) REST API and a simple JSON API for a rayfine classifier. "
        "Every error is {\"error\": \"...\"}: a 4xx status for a refused request, 503 while the model loads.",
        # Guard drops one trailing slash; a path with more is no route (404), not a 307 to a URL built
        # from the client's Host header with the scheme http.
        redirect_slashes=False,
    )
    _add_error_handlers(app)
    _add_v2_health_and_metadata(app, server)  # the OpenAPI schema lists the routes in this order
    _add_v2_inference(app, server)
    _add_predict(app, server)
    app.openapi = functools.partial(_openapi_schema, app, server, app.openapi)
    app.add_middleware(Guard, server=server)
    if server.settings.cors_origins:  # added last: outside the Guard, so that preflights need no key
        app.add_middleware(CORS, allow_origins=list(server.settings.cors_origins), allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=CORS_HEADERS, expose_headers=[protocol.BINARY_HEADER, "Content-Encoding"])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as {"error": "..."} with its 4xx status; a bug as a 500 that names no details."""

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route; see /docs (OpenAPI: /openapi.json)"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and headers and "Allow" in headers:
            # Allow lists every method the route answers (RFC 9110 10.2.1); Guard answers HEAD
            # wherever GET is, which the router does not know.
            methods = [m.strip() for m in headers["Allow"].split(",")]
            if "GET" in methods and "HEAD" not in methods:
                headers = {**headers, "Allow": ", ".join([*methods, "HEAD"])}
        return error(exc.status_code, detail, headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect):
        # Nobody reads it; the log shows 499 (client closed request), as Ray Serve's proxy logs a
        # client that left while its request waited, not a 500 counted as the server's error.
        return error(499, "the client disconnected before it sent the whole request body")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # a bug: say so without details
        return error(500, f"internal error ({type(exc).__name__}); see the replica's log")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return error(400, protocol.describe_validation(list(exc.errors())))


def _model_or_404(server, name: str, version: Optional[str] = None):
    """The replica's model now, if ``name`` (and ``version``, when given) are its; else a 404 (503
    before the model is loaded)."""
    if name != server.name:
        raise RequestError(f"unknown model {name!r}; this server serves {server.name!r}", status=404)
    model = server.model
    if model is None:
        raise RequestError("the model is not loaded yet", status=503)
    if version is not None and version != model.version:
        raise RequestError(f"model {name!r} has no version {version!r}; serving version {model.version!r}", status=404)
    return model


async def _answer(server, items: list, model):
    """The model's answer to ``items``; an input it refused (result.error) is a 400 naming it."""
    result = await server.infer(items, model)
    if result.error is not None:
        raise RequestError(result.error)
    return result


def _add_v2_health_and_metadata(app: FastAPI, server) -> None:
    """Open Inference Protocol: health, server and model metadata, and Triton's statistics."""
    @app.get("/v2/health/live", tags=["v2"], summary="Server live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], summary="Server ready")
    async def ready():
        is_ready = server.model is not None
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2", tags=["v2"], summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": "rayfine", "version": app.version, "extensions": ["binary_tensor_data", "classification", "statistics"]}

    def model_stats(name: Optional[str] = None, version: Optional[str] = None) -> dict:
        model = _model_or_404(server, server.name if name is None else name, version)
        s = model.stats
        return {"model_stats": [{
            "name": server.name, "version": model.version, "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count, "execution_count": s.execution_count,
            "inference_stats": s.inference_stats(), "batch_stats": s.batch_stats(), "replica": server.replica_id,
        }]}

    # Before /v2/models/{name}, which would take "stats" for a model's name.
    @app.get("/v2/models/stats", tags=["v2"], summary=f"{STATS_SUMMARY}: every model", responses=errors(503))
    async def all_models_stats() -> dict:
        return model_stats()

    def metadata(name: str, version: Optional[str]) -> protocol.ModelMetadata:
        model = _model_or_404(server, name, version)
        return protocol.ModelMetadata(
            name=server.name, versions=[model.version], platform="pytorch",
            inputs=protocol.model_inputs(model.kind, model.cfg.data.channels, model.pairs),
            outputs=protocol.model_outputs(len(model.labels)),
        )

    @app.get("/v2/models/{name}", tags=["v2"], summary="Model metadata", response_model=protocol.ModelMetadata,
             responses=errors(404, 503))
    async def model_metadata(name: str):
        return metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"], summary="Model metadata (a version)",
             response_model=protocol.ModelMetadata, responses=errors(404, 503))
    async def model_version_metadata(name: str, version: str):
        return metadata(name, version)

    @app.get("/v2/models/{name}/ready", tags=["v2"], summary="Model ready", responses=errors(404, 503))
    async def model_ready(name: str) -> dict:
        _model_or_404(server, name)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"], summary="Model ready (a version)",
             responses=errors(404, 503))
    async def model_version_ready(name: str, version: str) -> dict:
        _model_or_404(server, name, version)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/stats", tags=["v2"], summary=STATS_SUMMARY, responses=errors(404, 503))
    async def one_model_stats(name: str) -> dict:
        return model_stats(name)

    @app.get("/v2/models/{name}/versions/{version}/stats", tags=["v2"], summary=f"{STATS_SUMMARY} (a version)",
             responses=errors(404, 503))
    async def model_version_stats(name: str, version: str) -> dict:
        return model_stats(name, version)


async def _infer(server, request: Request, name: str, version: Optional[str]) -> Response:
    """An Open Inference Protocol inference request: JSON, or JSON then binary tensor data."""
    model = _model_or_404(server, name, version)
    # Any type but multipart is read as JSON (+ binary data), as Triton does: tritonclient sends none,
    # curl -d sends a form's, a browser's fetch with a string body text/plain.
    if _content_type(request).startswith("multipart/"):
        _require(request, JSON, BINARY)
    head, binary = protocol.split_body(await request.body(), request.headers.get(protocol.BINARY_HEADER))
    req = protocol.parse_json(protocol.InferenceRequest, head)
    items = protocol.v2_items(req, model.kind, server.settings, binary, pairs=model.pairs)
    as_binary = protocol.binary_outputs(req)
    result = await _answer(server, items, model)
    response = protocol.v2_response(server.name, result.version, result.labels, result.probs, req)
    coding = response_coding(request.headers.get("accept-encoding"))
    # Vary on every answer, compressed or not: caches must not give one to a client that sent
    # another Accept-Encoding (RFC 9110 12.5.5).
    headers = {"Vary": "Accept-Encoding"}
    if as_binary:
        head, tail = protocol.to_binary(response, as_binary)
        body, media_type = head + tail, BINARY
        headers[protocol.BINARY_HEADER] = str(len(head))
    else:
        body, media_type = json.dumps(response, separators=(",", ":")).encode(), JSON
    if coding is not None:  # as Triton: the header length counts the JSON before compression
        body, headers["Content-Encoding"] = compress(body, coding), coding
    return Response(body, media_type=media_type, headers=headers)


def _add_v2_inference(app: FastAPI, server) -> None:
    """Open Inference Protocol: the two inference routes (the model's, and a version's)."""
    infer_body = {"requestBody": {"required": True, "content": {
        JSON: {"schema": _schema_ref(protocol.InferenceRequest)},
        BINARY: {"schema": {"type": "string", "format": "binary", "description": (
            f"binary tensor data extension: the JSON inference request ({protocol.BINARY_HEADER} bytes), "
            "then the bytes of the input whose parameters.binary_data_size gives their length")}},
    }}}
    infer_responses = {
        200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary", "description": (
            f"when outputs are asked for as binary data: the JSON inference response ({protocol.BINARY_HEADER} bytes), "
            "then the bytes of each output whose parameters.binary_data_size gives their length")}}}},
        **errors(400, 404, 413, 415, 503),
    }

    @app.post("/v2/models/{name}/infer", tags=["v2"], summary="Inference", openapi_extra=infer_body,
              response_model=protocol.InferenceResponse, response_model_exclude_none=True, responses=infer_responses)
    async def model_infer(name: str, request: Request):
        return await _infer(server, request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"], summary="Inference (a version)",
              openapi_extra=infer_body, response_model=protocol.InferenceResponse, response_model_exclude_none=True,
              responses=infer_responses)
    async def model_version_infer(name: str, version: str, request: Request):
        return await _infer(server, request, name, version)


def _add_predict(app: FastAPI, server) -> None:
    """The simple JSON API: POST /predict with texts or images, JSON or multipart."""
    predict_body = {"requestBody": {"required": True, "content": {
        JSON: {"schema": _schema_ref(protocol.PredictRequest)},
        MULTIPART: {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "image files (image models) or UTF-8 text files (text models)"},
            "inputs": {"type": "array", "items": {"type": "string"},
                       "description": "texts (text models; a model trained on text pairs takes them as JSON only)"},
        }}},
    }}}

    @app.post("/predict", tags=["simple"], summary="Predict labels for texts or images", openapi_extra=predict_body,
              response_model=protocol.PredictResponse, response_model_exclude_none=True, responses=errors(400, 413, 415, 503))
    async def predict(request: Request, top_k: Optional[int] = None):
        model = _model_or_404(server, server.name)
        # No Content-Type is JSON, as on the v2 routes (requests.post(url, data=json.dumps(...)) sends none).
        ctype = _require(request, JSON, MULTIPART) if _content_type(request) else JSON
        if ctype == JSON:
            req = protocol.parse_json(protocol.PredictRequest, await request.body())
            items, k = protocol.predict_items(req, model.kind, server.settings, pairs=model.pairs), req.top_k
        else:
            items, k = await _multipart_items(request, model.kind, server.settings, model.pairs), 5
        if top_k is not None:
            k = top_k
        if k < 1:
            raise RequestError("top_k must be at least 1")
        result = await _answer(server, items, model)
        return protocol.predict_response(server.name, result.version, result.labels, result.probs, k)


def _openapi_schema(app: FastAPI, server, generate) -> dict[str, Any]:
    """FastAPI's schema (``generate``), once, completed: the JSON schemas the routes reference by
    hand, no 422 (a bad parameter is a 400), and with an API key, its schemes and 401s."""
    if app.openapi_schema is None:
        schema = generate()
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        # The JSON schemas the routes reference by hand (openapi_extra).
        for model in (protocol.InferenceRequest, protocol.PredictRequest):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(model_schema.pop("$defs", {}))
            schemas[model.__name__] = model_schema
        # FastAPI's 422 never comes: a bad parameter is a 400 {"error": ...} (_validation_error).
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        if server.api_key is not None:  # the routes that need the key say so; Swagger UI's Authorize sends it
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                             "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if server.api_key is not None and path not in OPEN_PATHS:
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
                    unauthorized = {"description": ERRORS[401], "content": {JSON: {"schema": _schema_ref(protocol.ErrorResponse)}}}
                    operation["responses"] = dict(sorted({**operation["responses"], "401": unauthorized}.items()))
        app.openapi_schema = schema
    return app.openapi_schema


async def _multipart_items(request: Request, kind: str, limits, pairs: bool) -> list:
    try:
        form = await request.form(max_files=limits.max_items, max_fields=limits.max_items + 8)
    except HTTPException:
        raise
    except Exception as e:  # python-multipart's parse errors, too many parts
        raise RequestError(f"malformed multipart body: {e}") from None
    files, texts = [], []
    try:
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((value.filename or key, await value.read()))
            elif key == "inputs":
                texts.append(value)
            else:
                raise RequestError(f"unknown form field {key!r}: send files, or texts in fields named 'inputs'")
    finally:
        await form.close()
    return protocol.upload_items(files, texts, kind, limits, pairs)
