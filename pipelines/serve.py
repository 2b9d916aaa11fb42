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
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.exceptions
from fastapi import Request
from fastapi.responses import HTMLResponse
from PIL import Image
from ray import serve

from mmcore.config import ConfigError, from_dict, to_dict
from mmcore.eval.zeroshot import class_prompts
from mmcore.serving import BadInput, IndexRecords, Limits, decode_image, read_index
from mmcore.tasks import GenerationConfig, cannot
from mmcore.tracking import MODEL_URI_SCHEMES, check_model, registry_ref
from mmcore.vectors import VectorIndex, locate, read_meta
from pipelines import api, flags, job
from pipelines.progress import Progress

if TYPE_CHECKING:  # torch and the model code: a replica imports them where it loads a model
    from mmcore.inference import Engine, Index

log = logging.getLogger(__name__)
CONFIG = Path(__file__).parent / "configs" / "serve.yaml"
PAGE = Path(__file__).parent / "static" / "index.html"
PROMPT_CACHE = 4096  # prompt embeddings kept per model for /v1/classify
APP = "mmray"  # the Serve application's name


@dataclasses.dataclass
class _Loaded:
    """One model as loaded by one reconfigure; a request keeps the one it started with."""

    engine: "Engine"
    info: dict[str, Any]
    index: "Index | None"
    prompts: OrderedDict = dataclasses.field(default_factory=OrderedDict)  # text → (E,)


def _load(spec: api.ModelSpec, records: IndexRecords | None, vectors: str | None) -> _Loaded:
    """The model ``spec`` names, and its search index: the shards' images embedded by it, or
    the saved index at ``vectors`` (refused unless that model version built it)."""
    from mmcore.export import load_model
    from mmcore.inference import Engine
    from mmcore.tracking import resolve_model

    ref = resolve_model(spec.uri)  # an alias resolved once: the weights and the info agree
    engine = Engine(load_model(ref.folder), spec.backend)
    cfg = engine.cfg
    if vectors is not None:
        index = VectorIndex.load(vectors, ref.resolved)
    else:
        index = engine.index(records.images) if records is not None else None
    info = ref.info() | {
             "fusion": cfg.fusion, "embed_dim": cfg.embed_dim, "backend": engine.backend,
             "image_size": cfg.vision.image_size, "revision": spec.revision,
             "generates": engine.model.generates,
             "captions": cannot(engine.model, "caption") is None,  # /v1/caption answers
             "answers": cannot(engine.model, "vqa") is None,  # /v1/vqa answers
             "index_size": len(index) if index is not None else 0,
             "replica": serve.get_replica_context().replica_id.unique_id}  # fmt: skip
    log.info("loaded %s (%s, %s)", info["resolved"], cfg.fusion, engine.backend)
    return _Loaded(engine, info, index)


async def _in_groups(
    items: list[tuple[_Loaded, Any, Any]], run: Callable[[_Loaded, Any, list], Any],
    alone: Callable[[Any], bool] = lambda setting: False,
) -> list:  # fmt: skip
    """A dynamic batch's (model, setting, value) items: one ``run(model, setting, values)`` in
    a thread per model and setting (items of a batch may come from different models around a
    switch; a setting that is ``alone`` runs item by item); the results in item order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (loaded, setting, _) in enumerate(items):
        groups[id(loaded), setting, i if alone(setting) else None].append(i)
    out: list = [None] * len(items)
    for rows in groups.values():
        loaded, setting, _ = items[rows[0]]
        results = await asyncio.to_thread(run, loaded, setting, [items[i][2] for i in rows])
        for i, result in zip(rows, results, strict=True):
            out[i] = result
    return out


SCORE_KIND = "mean token log-probability"


@serve.deployment
@serve.ingress(api.routes)
class Model:
    """The model and its HTTP API in one deployment: one hop from Serve's proxy to the model
    (a second deployment behind a handle halved the QPS on CPU; docs/BENCHMARKS.md). Texts
    and images are embedded in dynamic batches across concurrent requests."""

    def __init__(
        self, index: str | None, index_limit: int | None, limits: dict[str, Any],
        templates: list[str],
    ) -> None:  # fmt: skip
        self.vectors = locate(index) if index else None  # a saved search index's folder
        self.records = read_index(index, index_limit) if index and not self.vectors else None
        self.limits = from_dict(Limits, limits)
        self.templates = templates
        self.loaded: _Loaded | None = None
        self.batch_sizes: Counter[int] = Counter()  # forward passes by batch size, in /v1/model

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model that ``user_config`` (an api.ModelSpec) names beside the current one,
        then swap: requests keep being answered by the old one while the new one loads."""
        spec = from_dict(api.ModelSpec, dict(user_config))
        loaded = await asyncio.to_thread(_load, spec, self.records, self.vectors)
        self._encode.set_max_batch_size(spec.max_batch_size)
        self._encode.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.loaded = loaded

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode(self, items: list[tuple[_Loaded, str, Any]]) -> list[np.ndarray]:
        """(model, "text" | "image", one text or image) → its embedding (E,). Items of one
        batch may come from different models around a switch: each runs on its own. The
        forward pass runs in a thread, so the event loop parses the next requests meanwhile."""
        self.batch_sizes[len(items)] += 1

        def encode(loaded: _Loaded, kind: str, values: list) -> Any:
            engine = loaded.engine
            return (engine.embed_texts if kind == "text" else engine.embed_images)(values)

        return await _in_groups(items, encode)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate(
        self, items: list[tuple[_Loaded, tuple[str, GenerationConfig], tuple[Image.Image, str]]]
    ) -> list[list[tuple[str, float]]]:
        """(model, (task, settings), (image, question)) → [(text, score)], best first: the
        ``num_return_sequences`` captions (task "caption"; the question is ignored) or an
        answer ("vqa"), batched over requests with the same model, task and settings; a
        seeded sample alone, so that its seed alone decides its text."""

        def run(loaded: _Loaded, setting: tuple[str, GenerationConfig], inputs: list) -> Any:
            (task, cfg), images = setting, [image for image, _ in inputs]
            if task == "caption":
                texts = loaded.engine.caption(images, cfg)
            else:
                texts = loaded.engine.answer(images, [q for _, q in inputs], cfg)
            r = cfg.num_return_sequences
            return [texts[i : i + r] for i in range(0, len(texts), r)]

        return await _in_groups(items, run, alone=lambda setting: setting[1].top_p is not None)

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

    @api.routes.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.loaded.info["resolved"]}

    @api.routes.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        """The model, and this replica's dynamic batches so far (size → how many)."""
        return self.loaded.info | {"batch_sizes": dict(sorted(self.batch_sizes.items()))}

    @api.routes.post("/v1/embed", openapi_extra=api.body_doc(api.EmbedRequest))
    async def embed(self, request: Request) -> dict[str, Any]:
        req = await api.read_request(request, api.EmbedRequest, self.limits)
        api.check_embed(req, self.limits)
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

    @api.routes.post("/v1/classify", openapi_extra=api.body_doc(api.ClassifyRequest))
    async def classify(self, request: Request) -> dict[str, Any]:
        req = await api.read_request(request, api.ClassifyRequest, self.limits)
        labels, templates = req.labels, api.check_classify(req, self.limits, self.templates)
        image = self._image(req.image)
        loaded = self.loaded
        engine = loaded.engine
        if not engine.model.scores_pairs:  # embeddings, batched; prompts cached
            (image_embed,) = await self._embed_all(loaded, "image", [image])
            prompt_embeds = await self._prompt_embeds(loaded, class_prompts(labels, templates))
            probs = engine.probs_from_embeddings(image_embed[None], prompt_embeds, len(labels))
        else:  # an ITM pass per (image, prompt)
            probs = await asyncio.to_thread(engine.classify, [image], labels, templates)
        ranked = sorted(zip(labels, probs[0].tolist(), strict=True), key=lambda p: -p[1])
        return {"labels": [{"label": label, "probability": p} for label, p in ranked]}

    @api.routes.post("/v1/search", openapi_extra=api.body_doc(api.SearchRequest))
    async def search(self, request: Request) -> dict[str, Any]:
        req = await api.read_request(request, api.SearchRequest, self.limits)
        api.check_search(req, self.limits)
        image = None if req.image is None else self._image(req.image)
        loaded = self.loaded
        if loaded.index is None:
            raise BadInput("no search index is loaded: start the server with --index SHARDS", 404)
        if isinstance(loaded.index, VectorIndex):  # a saved index: ITC embeddings, no images
            query = await self._encode((loaded, "text", req.text) if image is None
                                       else (loaded, "image", image))  # fmt: skip
            vectors = loaded.index
            return {"hits": [{"key": vectors.keys[i], "caption": vectors.captions[i],
                              "score": score, "thumbnail": None}
                             for i, score in vectors.search(query, req.k)],
                    "score": "cosine"}  # fmt: skip
        hits, kind = await asyncio.to_thread(
            loaded.engine.search, loaded.index, req.k, text=req.text, image=image
        )
        records = self.records
        return {
            "hits": [
                {"key": records.keys[i], "caption": records.captions[i], "score": score,
                 "thumbnail": records.thumbnails[i]}
                for i, score in hits
            ],
            "score": kind,
        }  # fmt: skip

    @api.routes.post("/v1/match", openapi_extra=api.body_doc(api.MatchRequest))
    async def match(self, request: Request) -> dict[str, Any]:
        req = await api.read_request(request, api.MatchRequest, self.limits)
        api.check_match(req, self.limits)
        image = self._image(req.image)
        scores, kind = await asyncio.to_thread(self.loaded.engine.match, image, req.texts)
        return {"scores": scores.tolist(), "score": kind}

    @api.routes.post("/v1/caption", openapi_extra=api.body_doc(api.CaptionRequest))
    async def caption(self, request: Request) -> dict[str, Any]:
        req = await api.read_request(request, api.CaptionRequest, self.limits)
        loaded = self.loaded
        cfg = api.check_caption(req, self.limits, loaded.engine.model)
        texts = await self._generate((loaded, ("caption", cfg), (self._image(req.image), "")))
        (text, score), captions = texts[0], [{"caption": t, "score": s} for t, s in texts]
        return {"caption": text, "score": score, "captions": captions, "score_kind": SCORE_KIND}

    @api.routes.post("/v1/vqa", openapi_extra=api.body_doc(api.VqaRequest))
    async def vqa(self, request: Request) -> dict[str, Any]:
        req = await api.read_request(request, api.VqaRequest, self.limits)
        loaded = self.loaded
        cfg = api.check_vqa(req, self.limits, loaded.engine.model)
        inputs = (self._image(req.image), req.question)
        ((text, score),) = await self._generate((loaded, ("vqa", cfg), inputs))
        return {"answer": text, "score": score, "score_kind": SCORE_KIND}

    @api.routes.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE.read_text()


# --- building and running ----------------------------------------------------------------------


def build(cfg: api.ServeConfig):
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
    cfg = from_dict(api.ServeConfig, dict(args))
    if cfg.index and not locate(cfg.index):  # `serve run` builds the app here: a bad index
        job.shard_paths(cfg.index, "index")  # stops it (the model comes in the user_config)
    return build(cfg)


def check(cfg: api.ServeConfig) -> None:
    """The model and the index must resolve here, before Ray and Serve start: a replica that
    cannot load its model only says "Failed to update the deployments"."""
    check_model(cfg.model.uri)
    if cfg.index and (folder := locate(cfg.index)):  # a saved index: for this model version
        uri = cfg.model.uri  # its version, without downloading the model here
        read_meta(folder, registry_ref(uri).resolved if uri.startswith(MODEL_URI_SCHEMES) else uri)
    elif cfg.index:
        job.shard_paths(cfg.index, "index")


def need(cfg: api.ServeConfig) -> job.Need:
    return job.Need(cpus=cfg.replicas.min_replicas * cfg.replicas.num_cpus)


def _run_showing_replicas(app: Any, replicas: int) -> None:
    """``serve.run`` (it returns when the app is running), with the replicas ready so far as
    progress (``pipelines.progress``) while the model loads."""
    done = threading.Event()
    progress = Progress("serve", replicas, "replicas", every_s=5.0, from_start=True)

    def watch() -> None:
        while not done.wait(1.0):
            try:
                status = serve.status().applications.get(APP)
            except Exception:  # noqa: BLE001 - the controller is starting: no count yet
                continue
            deployments = status.deployments.values() if status else []
            ready = sum(d.replica_states.get("RUNNING", 0) for d in deployments)
            progress.update(min(replicas, ready) - progress.n)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        serve.run(app, name=APP, route_prefix="/")
    finally:
        done.set()
        thread.join(timeout=5)
    progress.update(replicas - progress.n)  # running: every replica is up
    progress.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = flags.parser("mmray serve", __doc__, flags.SERVE, "a Serve config file", str(CONFIG))
    p.add_argument("--host", help="default 127.0.0.1 (from the config)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--address", help="a running Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--detach", action="store_true", help="deploy onto the cluster and return")
    args = p.parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        p.error(f"--port {args.port}: need 1-65535")
    args.values = flags.values(args, flags.SERVE)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        print("mmray serve: error: --detach needs a running cluster (--address or RAY_ADDRESS)",
              file=sys.stderr)  # fmt: skip
        return 2
    http: dict[str, Any] = {}

    def parse() -> api.ServeConfig:
        cfg, options = api.config_from(args.config, args.overrides, args.values)
        http.update(options)
        return cfg

    def deploy(cfg: api.ServeConfig) -> dict[str, Any]:
        host, port = args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000)
        try:
            serve.start(http_options={"host": host, "port": port})
        except ray.exceptions.RayTaskError as e:  # Serve's proxy could not listen there
            if "Failed to bind" not in str(e):
                raise
            raise ConfigError(f"cannot listen on {host}:{port}: is another server using it? "
                              "Give another --port") from None  # fmt: skip
        # serve.run then finds the controller serve.start made and says so, every time.
        job.drop_log_lines("ray.serve", "Connecting to existing Serve app")
        _run_showing_replicas(build(cfg), cfg.replicas.min_replicas)
        url = f"http://{host}:{port}"
        return {"url": url, "docs": f"{url}/docs", "model": cfg.model.uri}

    rc = job.main("mmray serve", parse, deploy, check, need, args.address, log_to_driver=False)
    if rc or args.detach:  # detached: Serve keeps the app running in the cluster
        return rc
    # The handlers only append: an Event's set() takes a lock, and a second signal arriving
    # during the first handler's set() (pkill reaching a wrapper and mmray) deadlocked on it.
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: signals.append(signum))
    while not signals:
        time.sleep(0.2)
    # Delete the app (its replicas drain their requests), not Serve: on a shared cluster other
    # apps keep running, and a local Ray takes Serve down when this process exits.
    # serve.shutdown() also made the raylet print "Task ServeController.graceful_shutdown
    # failed ... killed by `ray.kill`" at every stop (the controller ends that call by exiting).
    serve.delete(APP)
    return 0


if __name__ == "__main__":
    sys.exit(main())
