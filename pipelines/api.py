"""The Serve application's config and its HTTP requests, without Ray: the config dataclasses
(``args`` and ``user_config`` of serve.yaml), request schemas, JSON or multipart parsing, and
the checks that turn bad input into a 4xx with a message (``BadInput``).
``pipelines/serve.py`` puts its routes on ``routes``; tests reach all of this without a cluster.
"""

# No ``from __future__ import annotations``: FastAPI and pydantic read these annotations.
import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from mmcore.config import ConfigError, apply_overrides, from_dict, merge
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES
from mmcore.serving import BadInput, Limits
from mmcore.tasks import ANSWER, GenerationConfig, cannot, question_prompts

IMPORT_PATH = "pipelines.serve:app"


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
    index: str | None = None  # curated shards, or a saved search index (mmray index)
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


# --- the deployment ------------------------------------------------------------------------


def config_from(
    path: str | Path, overrides: list[str] = (), values: dict[str, Any] | None = None
) -> tuple[ServeConfig, dict[str, Any]]:
    """A Serve config file → the ServeConfig of its mmray application (``args``, with the
    Model deployment's ``user_config`` as ``model``, then ``values`` (dotted keys) and the
    overrides) and its ``http_options``."""
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
    cfg = from_dict(ServeConfig, apply_overrides(merge(args, values or {}), overrides))
    return cfg, text.get("http_options") or {}


# --- the HTTP API --------------------------------------------------------------------------

routes = FastAPI(
    title="mmray",
    description="Image-text embeddings, zero-shot classification, search, matching, captions "
    "and visual question answering.",
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


class CaptionRequest(_Request):
    image: str | bytes
    num_beams: int = 1
    max_new_tokens: int = 20
    top_p: float | None = None  # nucleus sampling
    temperature: float = 1.0
    seed: int | None = None
    num_return_sequences: int = 1  # the best beams, at most num_beams


class VqaRequest(_Request):
    image: str | bytes
    question: str
    num_beams: int = 1
    max_new_tokens: int = ANSWER.max_new_tokens


LIST_FIELDS = {"texts", "images", "labels", "templates"}


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
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


@routes.exception_handler(BadInput)
async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
    return _error(exc.status, str(exc))


@routes.exception_handler(HTTPException)
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


# --- what each endpoint accepts ------------------------------------------------------------


def check_embed(req: EmbedRequest, limits: Limits) -> None:
    check_texts("texts", req.texts, limits.max_texts, limits)
    check_count("images", req.images, limits.max_images)
    if not req.texts and not req.images:
        raise BadInput("send texts and/or images", 422)


def check_classify(req: ClassifyRequest, limits: Limits, default: list[str]) -> list[str]:
    """The templates to use (the request's, else ``default``)."""
    templates = default if req.templates is None else req.templates
    check_texts("labels", req.labels, limits.max_labels, limits, least=1)
    check_texts("templates", templates, limits.max_templates, limits, least=1)
    if any(not label.strip() for label in req.labels) or len(set(req.labels)) != len(req.labels):
        raise BadInput("labels: need distinct, non-empty labels", 422)
    if any("{}" not in t for t in templates):
        raise BadInput("templates: each needs a {} for the label", 422)
    return templates


def check_search(req: SearchRequest, limits: Limits) -> None:
    if (req.text is None) == (req.image is None):
        raise BadInput("send exactly one of text or image", 422)
    if not 1 <= req.k <= limits.max_k:
        raise BadInput(f"k: need 1 <= k <= {limits.max_k}", 422)
    if req.text is not None:
        check_texts("text", [req.text], 1, limits)


def check_match(req: MatchRequest, limits: Limits) -> None:
    check_texts("texts", req.texts, limits.max_texts, limits, least=1)


def check_caption(req: CaptionRequest, limits: Limits, model: Any) -> GenerationConfig:
    """The request's ``GenerationConfig`` for ``model``; 422 for a model whose decoder was not
    trained for captions, or for settings out of range (beams and tokens capped by
    ``limits``)."""
    return _generation(req, limits, model, "caption")


def check_vqa(req: VqaRequest, limits: Limits, model: Any) -> GenerationConfig:
    """As ``check_caption`` for the ``vqa`` objective, and a question that leaves the context
    room for an answer."""
    cfg = _generation(req, limits, model, "vqa")
    check_texts("question", [req.question], 1, limits)
    if not req.question.strip():
        raise BadInput("question: empty", 422)
    context = model.cfg.text.context_length
    if len(question_prompts([req.question], 2 * context)[0]) >= context:  # untruncated length
        raise BadInput(f"question: too long for a context of {context} tokens", 422)
    return cfg


def _generation(req: Any, limits: Limits, model: Any, objective: str) -> GenerationConfig:
    if reason := cannot(model, objective):
        raise BadInput(reason, 422)
    if req.num_beams > limits.max_beams:
        raise BadInput(f"num_beams: at most {limits.max_beams}", 422)
    if req.max_new_tokens > limits.max_new_tokens:
        raise BadInput(f"max_new_tokens: at most {limits.max_new_tokens}", 422)
    cfg = GenerationConfig(**req.model_dump(exclude={"image", "question"}))
    try:
        cfg.validate(model.cfg.text.context_length)
    except ValueError as e:
        raise BadInput(str(e), 422) from e
    return cfg
