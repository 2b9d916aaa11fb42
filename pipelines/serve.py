"""Serve a model over HTTP with Ray Serve: embed, zero-shot classify, search, match, a page.

    mmray serve --model URI [--index SHARDS] [--host 127.0.0.1] [--port 8000] [--detach]
        [key.sub=value ...]
    serve run pipelines/configs/serve.yaml       # the same application from a Serve config file
    serve deploy pipelines/configs/serve.yaml    # onto a running cluster (KubeRay: cluster/)

One deployment, ``Model``: a FastAPI ingress (it parses and checks requests, decodes images
and serves the page at /) around the model on a backend, with texts and images embedded in
dynamic batches across requests. The model URI lives in the deployment's ``user_config``:
deploying a changed ``uri`` (or ``revision``, which re-resolves a moved ``@champion``
alias) reconfigures the running replicas; requests in flight finish on the model they
started with. Defaults: ``pipelines/configs/serve.yaml``.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the route signatures of a
# Serve ingress class at request time, and string annotations left it unable to (ForwardRef).
import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from mmcore.config import ConfigError, apply_overrides, from_dict, to_dict
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, class_prompts
from mmcore.export import check_reference
from mmcore.serving import BadInput, Engine, IndexRecords, Limits, decode_image, read_index
from pipelines import job
from pipelines.train import shard_paths

log = logging.getLogger(__name__)
CONFIG = Path(__file__).parent / "configs" / "serve.yaml"
PAGE = Path(__file__).parent / "static" / "index.html"
IMPORT_PATH = "pipelines.serve:app"
PROMPT_CACHE = 4096  # prompt embeddings kept per model for /v1/classify


@dataclasses.dataclass(kw_only=True)
class ModelSpec:
    """The Model deployment's ``user_config``: deploying a change reconfigures it in place."""

    uri: str = "models:/mmray-tiny@champion"  # folder, runs:/ID/model or models:/NAME@ALIAS
    revision: int = 0  # bump to reload the same URI (an alias that moved)
    backend: Literal["torch", "onnx", "onnx-int8"] = "torch"
    max_batch_size: int = 32  # 1 turns dynamic batching off
    batch_wait_timeout_s: float = 0.005  # how long a batch waits to fill

    def validate(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("need max_batch_size >= 1 and batch_wait_timeout_s >= 0")


@dataclasses.dataclass(kw_only=True)
class ReplicaConfig:
    """The Model deployment's scaling. Serve never hands a replica more than
    ``max_ongoing_requests`` at once, so a batch cannot outgrow it (ray #43288)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 16  # autoscaling aims at this many per replica
    max_ongoing_requests: int = 64
    num_cpus: float = 1.0


@dataclasses.dataclass(kw_only=True)
class ServeConfig:
    """The application's arguments (``args`` in serve.yaml)."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    index: str | None = None  # curated shards to search over
    index_limit: int | None = None  # index at most this many samples
    templates: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    replicas: ReplicaConfig = dataclasses.field(default_factory=ReplicaConfig)
    limits: Limits = dataclasses.field(default_factory=Limits)

    def validate(self) -> None:
        r, b = self.replicas, self.model
        if not 1 <= r.min_replicas <= r.max_replicas:
            raise ValueError("need 1 <= replicas.min_replicas <= replicas.max_replicas")
        if r.max_ongoing_requests < b.max_batch_size:
            raise ValueError(
                f"replicas.max_ongoing_requests ({r.max_ongoing_requests}) < "
                f"model.max_batch_size ({b.max_batch_size}): batches could never fill"
            )
        if not 1 <= r.target_ongoing_requests <= r.max_ongoing_requests:
            raise ValueError("need 1 <= target_ongoing_requests <= max_ongoing_requests")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("templates: need at least one, each with a {} for the label")


# --- the HTTP API --------------------------------------------------------------------------

api = FastAPI(
    title="mmray",
    description="Image-text embeddings, zero-shot classification, search and matching.",
    version="1",
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Request):
    texts: list[str] = []
    images: list[str | bytes] = []  # base64 (or data: URLs); raw files in multipart


class ClassifyRequest(_Request):
    image: str | bytes
    labels: list[str]
    templates: list[str] | None = None  # each with a {} for the label


class SearchRequest(_Request):
    text: str | None = None
    image: str | bytes | None = None
    k: int = 10


class MatchRequest(_Request):
    image: str | bytes
    texts: list[str]


LIST_FIELDS = {"texts", "images", "labels", "templates"}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body for an endpoint that reads JSON or a multipart form itself."""
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema},
                        "multipart/form-data": {"schema": schema}},
        }
    }  # fmt: skip


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(BadInput)
async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
    return _error(exc.status, str(exc))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


async def read_request(request: Request, schema: type[BaseModel], limits: Limits) -> Any:
    """JSON or a multipart form → a validated request; every failure is a ``BadInput``."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadInput(f"request body is over the {limit}-byte limit", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadInput(f"request body is over the {limit}-byte limit", 413)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        data = await _form(request, bytes(body), limits)
    elif kind in ("application/json", ""):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInput(f"invalid JSON: {e}") from e
    else:
        raise BadInput(f"unsupported content type {kind!r}: send JSON or multipart", 415)
    if not isinstance(data, dict):
        raise BadInput("the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise BadInput(problems, 422) from e


async def _form(request: Request, body: bytes, limits: Limits) -> dict[str, Any]:
    """A multipart form → the JSON shape: list fields repeat, files become bytes."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    n = limits.max_texts + limits.max_images + limits.max_labels
    try:
        form = await Request(request.scope, replay).form(max_files=n, max_fields=n)
    except HTTPException as e:
        raise BadInput(f"invalid multipart form: {e.detail}") from e
    data: dict[str, Any] = {}
    for key in form:
        values = [await v.read() if hasattr(v, "read") else v for v in form.getlist(key)]
        data[key] = values if key in LIST_FIELDS else values[-1]
    if isinstance(data.get("k"), str) and data["k"].isdigit():
        data["k"] = int(data["k"])
    return data


def check_count(name: str, values: list, most: int, least: int = 0) -> None:
    if len(values) > most:
        raise BadInput(f"{name}: {len(values)} items, at most {most} per request", 413)
    if len(values) < least:
        raise BadInput(f"{name}: need at least {least}", 422)


def check_texts(name: str, values: list[str], most: int, limits: Limits, least: int = 0) -> None:
    check_count(name, values, most, least)
    if any(len(v) > limits.max_text_chars for v in values):
        raise BadInput(f"{name}: an item is over {limits.max_text_chars} characters")


# --- the deployment ------------------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    """One model as loaded by one reconfigure; a request keeps the one it started with."""

    engine: Engine
    info: dict[str, Any]
    index: Any  # mmcore.serving.Index or None
    prompts: OrderedDict = dataclasses.field(default_factory=OrderedDict)  # text → (E,)


def _load(spec: ModelSpec, records: IndexRecords | None) -> _Loaded:
    from mmcore.export import load_model
    from mmcore.tracking import model_info

    info = model_info(spec.uri)  # resolves an alias once: the weights and the info agree
    engine = Engine(load_model(info["resolved"]), spec.backend)
    cfg = engine.cfg
    info |= {"fusion": cfg.fusion, "embed_dim": cfg.embed_dim, "backend": engine.backend,
             "image_size": cfg.vision.image_size, "revision": spec.revision,
             "index_size": len(records.keys) if records is not None else 0,
             "replica": serve.get_replica_context().replica_id.unique_id}  # fmt: skip
    index = engine.index(records) if records is not None else None
    log.info("loaded %s (%s, %s)", info["resolved"], cfg.fusion, engine.backend)
    return _Loaded(engine, info, index)


@serve.deployment
@serve.ingress(api)
class Model:
    """The model and its HTTP API in one deployment: one hop from Serve's proxy to the model
    (a second deployment behind a handle halved the QPS on CPU; docs/BENCHMARKS.md). Texts
    and images are embedded in dynamic batches across concurrent requests."""

    def __init__(
        self, index: str | None, index_limit: int | None, limits: dict[str, Any],
        templates: list[str],
    ) -> None:  # fmt: skip
        self.records = read_index(index, index_limit) if index else None
        self.limits = from_dict(Limits, limits)
        self.templates = templates
        self.loaded: _Loaded | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model that ``user_config`` (a ModelSpec) names beside the current one,
        then swap: requests keep being answered by the old one while the new one loads."""
        spec = from_dict(ModelSpec, dict(user_config))
        loaded = await asyncio.to_thread(_load, spec, self.records)
        self._encode.set_max_batch_size(spec.max_batch_size)
        self._encode.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.loaded = loaded

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode(self, items: list[tuple[_Loaded, str, Any]]) -> list[np.ndarray]:
        """(model, "text" | "image", one text or image) → its embedding (E,). Items of one
        batch may come from different models around a switch: each runs on its own. The
        forward pass runs in a thread, so the event loop parses the next requests meanwhile."""
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, (loaded, kind, _) in enumerate(items):
            groups[id(loaded), kind].append(i)
        out: list = [None] * len(items)
        for rows in groups.values():
            loaded, kind, _ = items[rows[0]]
            encode = loaded.engine.embed_texts if kind == "text" else loaded.engine.embed_images
            embeds = await asyncio.to_thread(encode, [items[i][2] for i in rows])
            for i, embed in zip(rows, embeds, strict=True):
                out[i] = embed
        return out

    async def _embed_all(self, loaded: _Loaded, kind: str, values: list) -> list[np.ndarray]:
        return await asyncio.gather(*(self._encode((loaded, kind, v)) for v in values))

    async def _prompt_embeds(self, loaded: _Loaded, prompts: list[str]) -> np.ndarray:
        cache = loaded.prompts
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        embeds = await self._embed_all(loaded, "text", missing)
        cache.update(zip(missing, embeds, strict=True))
        while len(cache) > PROMPT_CACHE:
            cache.popitem(last=False)
        return np.stack([cache[p] for p in prompts])

    def _image(self, value: str | bytes) -> Image.Image:
        return decode_image(value, self.limits)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.loaded.info["resolved"]}

    @api.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        return self.loaded.info

    @api.post("/v1/embed", openapi_extra=_body_doc(EmbedRequest))
    async def embed(self, request: Request) -> dict[str, Any]:
        req = await read_request(request, EmbedRequest, self.limits)
        check_texts("texts", req.texts, self.limits.max_texts, self.limits)
        check_count("images", req.images, self.limits.max_images)
        if not req.texts and not req.images:
            raise BadInput("send texts and/or images", 422)
        images = [self._image(v) for v in req.images]
        loaded = self.loaded
        texts, images = await asyncio.gather(
            self._embed_all(loaded, "text", req.texts), self._embed_all(loaded, "image", images)
        )
        return {
            "text_embeddings": [e.tolist() for e in texts],
            "image_embeddings": [e.tolist() for e in images],
            "dim": loaded.info["embed_dim"],
        }

    @api.post("/v1/classify", openapi_extra=_body_doc(ClassifyRequest))
    async def classify(self, request: Request) -> dict[str, Any]:
        req = await read_request(request, ClassifyRequest, self.limits)
        labels, templates = req.labels, self.templates if req.templates is None else req.templates
        check_texts("labels", labels, self.limits.max_labels, self.limits, least=1)
        check_texts("templates", templates, self.limits.max_templates, self.limits, least=1)
        if any(not label.strip() for label in labels) or len(set(labels)) != len(labels):
            raise BadInput("labels: need distinct, non-empty labels", 422)
        if any("{}" not in t for t in templates):
            raise BadInput("templates: each needs a {} for the label", 422)
        image = self._image(req.image)
        loaded = self.loaded
        engine = loaded.engine
        if engine.cfg.fusion == "late":
            (image_embed,) = await self._embed_all(loaded, "image", [image])
            prompt_embeds = await self._prompt_embeds(loaded, class_prompts(labels, templates))
            probs = engine.probs_from_embeddings(image_embed[None], prompt_embeds, len(labels))
        else:  # an ITM pass per (image, prompt)
            probs = await asyncio.to_thread(engine.classify, [image], labels, templates)
        ranked = sorted(zip(labels, probs[0].tolist(), strict=True), key=lambda p: -p[1])
        return {"labels": [{"label": label, "probability": p} for label, p in ranked]}

    @api.post("/v1/search", openapi_extra=_body_doc(SearchRequest))
    async def search(self, request: Request) -> dict[str, Any]:
        req = await read_request(request, SearchRequest, self.limits)
        if (req.text is None) == (req.image is None):
            raise BadInput("send exactly one of text or image", 422)
        if not 1 <= req.k <= self.limits.max_k:
            raise BadInput(f"k: need 1 <= k <= {self.limits.max_k}", 422)
        if req.text is not None:
            check_texts("text", [req.text], 1, self.limits)
        image = None if req.image is None else self._image(req.image)
        loaded = self.loaded
        if loaded.index is None:
            raise BadInput("no search index is loaded: start the server with --index SHARDS", 404)
        hits, kind = await asyncio.to_thread(
            loaded.engine.search, loaded.index, req.k, text=req.text, image=image
        )
        records = loaded.index.records
        return {
            "hits": [
                {"key": records.keys[i], "caption": records.captions[i], "score": score,
                 "thumbnail": records.thumbnails[i]}
                for i, score in hits
            ],
            "score": kind,
        }  # fmt: skip

    @api.post("/v1/match", openapi_extra=_body_doc(MatchRequest))
    async def match(self, request: Request) -> dict[str, Any]:
        req = await read_request(request, MatchRequest, self.limits)
        check_texts("texts", req.texts, self.limits.max_texts, self.limits, least=1)
        image = self._image(req.image)
        scores, kind = await asyncio.to_thread(self.loaded.engine.match, image, req.texts)
        return {"scores": scores.tolist(), "score": kind}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE.read_text()


# --- building and running ----------------------------------------------------------------------


def build(cfg: ServeConfig):
    """The Serve application for ``cfg``."""
    r = cfg.replicas
    return Model.options(
        autoscaling_config={"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                            "target_ongoing_requests": r.target_ongoing_requests},
        max_ongoing_requests=r.max_ongoing_requests,
        ray_actor_options={"num_cpus": r.num_cpus},
        user_config=to_dict(cfg.model),
    ).bind(cfg.index, cfg.index_limit, to_dict(cfg.limits), cfg.templates)  # fmt: skip


def app(args: dict[str, Any]):
    """Serve's application builder: ``import_path: pipelines.serve:app`` with ``args``."""
    cfg = from_dict(ServeConfig, dict(args))
    if cfg.index:  # `serve run` builds the app here: a bad index stops it before deploying
        shard_paths(cfg.index, "index")  # (the model comes later, in the user_config)
    return build(cfg)


def config_from(path: str | Path, overrides: list[str]) -> tuple[ServeConfig, dict[str, Any]]:
    """A Serve config file → the ServeConfig of its mmray application (``args``, with the
    Model deployment's ``user_config`` as ``model``, then the overrides) and its
    ``http_options``."""
    try:
        text = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from e
    apps = [a for a in text.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise ConfigError(f"{path}: no application with import_path {IMPORT_PATH}")
    args = dict(apps[0].get("args") or {})
    for deployment in apps[0].get("deployments") or []:
        if deployment.get("name") == "Model" and "user_config" in deployment:
            args["model"] = deployment["user_config"]
    cfg = from_dict(ServeConfig, apply_overrides(args, overrides))
    return cfg, text.get("http_options") or {}


def check(cfg: ServeConfig) -> None:
    """The model and the index must resolve here, before Ray and Serve start: a replica that
    cannot load its model only says "Failed to update the deployments"."""
    check_reference(cfg.model.uri)
    if cfg.index:
        shard_paths(cfg.index, "index")


def need(cfg: ServeConfig) -> job.Need:
    return job.Need(cpus=cfg.replicas.min_replicas * cfg.replicas.num_cpus)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmray serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="a Serve config file (serve.yaml)")
    p.add_argument("--model", help="folder, runs:/ID/model or models:/NAME@ALIAS")
    p.add_argument("--index", help="curated shards to search over")
    p.add_argument("--host", help="default 127.0.0.1 (from the config)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--address", help="a running Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--detach", action="store_true", help="deploy onto the cluster and return")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. model.max_batch_size=16")
    args = p.parse_args(argv)
    flags = [f"{k}={v}" for k, v in (("model.uri", args.model), ("index", args.index)) if v]
    args.overrides = flags + args.overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        print("mmray serve: error: --detach needs a running cluster (--address or RAY_ADDRESS)",
              file=sys.stderr)  # fmt: skip
        return 2
    http: dict[str, Any] = {}

    def parse() -> ServeConfig:
        cfg, options = config_from(args.config, args.overrides)
        http.update(options)
        return cfg

    def deploy(cfg: ServeConfig) -> dict[str, Any]:
        host, port = args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000)
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(cfg), name="mmray", route_prefix="/")
        url = f"http://{host}:{port}"
        return {"url": url, "docs": f"{url}/docs", "model": cfg.model.uri}

    rc = job.main("mmray serve", parse, deploy, check, need, args.address, log_to_driver=False)
    if rc or args.detach:  # detached: Serve keeps the app running in the cluster
        return rc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
