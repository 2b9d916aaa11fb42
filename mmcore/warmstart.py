"""Warm starts: a model's first weights taken from another model (``init.from``).

    init = InitConfig(source="models:/mmray-tiny@champion", modules=["towers", "projections"])
    warm = plan(init, build_model(cfg.model))   # ConfigError naming what does not fit
    model.load_state_dict(warm.state, strict=False)   # on every rank, before DeepSpeed
    warm.summary()                              # what was loaded, skipped, left fresh

The source is anything a model URI names (``runs:/ID/model``, ``models:/NAME@ALIAS``, an mmray
model folder, local or in object storage) or a folder that transformers' ``CLIPModel`` saved
(``save_pretrained``): its vision and text transformers and projections map onto mmray's
CLIP-style towers (``vision.stem=patch``, ``text.kind=transformer``; the text tower uses the
MiniLM tokenizer, so the source's vocabulary must be the same size).

``modules`` picks parts of the model by name (``GROUPS``; ``towers`` is vision and text).
With ``strict`` every parameter of those parts must be in the source with the same shape, and
every source tensor of those parts must fit the model; without it, what fits is loaded and the
rest stays as initialised. Parts not named always stay as initialised.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mmcore.config import ConfigError

# A part of the model → the state-dict keys it owns (a prefix ending in "." or a whole key).
GROUPS = {
    "vision": ("vision.",),
    "text": ("text.",),
    "projections": ("visual_projection.", "text_projection.", "logit_scale", "logit_bias"),
    "fusion": ("image_to_fusion.", "text_to_fusion.", "fusion.", "positions"),
    "heads": ("itm_head.", "lm_head."),
}
ALIASES = {"towers": ("vision", "text")}
# transformers' CLIPModel key prefix → mmray's (the towers wrap CLIPVisionModel/CLIPTextModel)
HF_PREFIXES = {"vision_model.": "vision.model.", "text_model.": "text.model."}
HF_ABSENT = {"logit_bias"}  # SigLIP's bias: CLIPModel has none, it stays as initialised
SHOWN = 8  # offending names listed in an error


@dataclasses.dataclass(kw_only=True)
class InitConfig:
    # runs:/ID/model, models:/NAME@ALIAS, an mmray model folder or a transformers CLIPModel
    # folder; empty: random init.
    source: str = dataclasses.field(default="", metadata={"key": "from"})
    modules: list[str] = dataclasses.field(
        default_factory=lambda: ["towers", "projections", "fusion", "heads"]
    )
    strict: bool = True  # every named part whole and of the same shape, or fail

    def validate(self) -> None:
        unknown = sorted(set(self.modules) - set(GROUPS) - set(ALIASES))
        if unknown:
            raise ValueError(f"modules: unknown {unknown}; choose from {[*ALIASES, *GROUPS]}")
        if not self.modules:
            raise ValueError("modules: name at least one part")

    def groups(self) -> list[str]:
        names = [g for m in self.modules for g in ALIASES.get(m, (m,))]
        return [g for g in GROUPS if g in names]


@dataclasses.dataclass
class WarmStart:
    source: str  # as given
    resolved: str  # the version it named when read (models:/NAME/VERSION), or the source
    kind: str  # "mmray" or "hf-clip"
    state: dict[str, torch.Tensor]  # what to load, under the model's keys
    skipped: dict[str, str]  # source key → why it was not loaded
    fresh: list[str]  # model keys left as initialised
    run_id: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "from": self.source, "resolved": self.resolved, "kind": self.kind,
            "run_id": self.run_id, "loaded": sorted(self.state), "skipped": self.skipped,
            "fresh": self.fresh,
        }  # fmt: skip

    def describe(self) -> str:
        """One log line: tensors loaded, left as initialised and skipped, by part."""

        def by_part(keys: Iterable[str]) -> str:
            counts = collections.Counter(group_of(k) or "other" for k in keys)
            return ", ".join(f"{g} {n}" for g, n in counts.items()) or "none"

        return (
            f"init.from {self.resolved} ({self.kind}): loaded {by_part(self.state)}; left as "
            f"initialised {by_part(self.fresh)}; skipped from the source {by_part(self.skipped)}"
        )


def group_of(key: str) -> str | None:
    for group, owned in GROUPS.items():
        if any(key.startswith(p) if p.endswith(".") else key == p for p in owned):
            return group
    return None


def plan(cfg: InitConfig, model: torch.nn.Module) -> WarmStart:
    """What ``model`` takes from ``cfg.source``; ``ConfigError`` (naming the tensors) when the
    source cannot be read or, with ``strict``, does not fit the parts named."""
    ref = _resolve(cfg.source)
    kind, source = read_weights(ref.folder)
    target = model.state_dict()
    groups = set(cfg.groups())
    state, skipped, problems = {}, {}, []
    for key, tensor in source.items():
        if group_of(key) not in groups:
            skipped[key] = "not in init.modules"
        elif key not in target:
            skipped[key] = "the model has no such tensor"
            problems.append(f"{key}: not in the model")
        elif tensor.shape != target[key].shape:
            why = f"shape {tuple(tensor.shape)} in the source, {tuple(target[key].shape)} here"
            skipped[key] = why
            problems.append(f"{key}: {why}")
        else:
            state[key] = tensor.to(target[key].dtype)
    fresh = [k for k in target if k not in state]
    absent = HF_ABSENT if kind == "hf-clip" else set()
    missing = [k for k in fresh if group_of(k) in groups and k not in skipped.keys() | absent]
    problems += [f"{key}: not in the source" for key in missing]
    if cfg.strict and problems:
        shown = "; ".join(problems[:SHOWN])
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise ConfigError(
            f"init.from {cfg.source}: does not fit init.modules={cfg.modules}: {shown}{more}. "
            "Name fewer parts in init.modules, or set init.strict=false to load what fits"
        )
    return WarmStart(cfg.source, ref.resolved, kind, state, skipped, fresh, ref.run_id)


def read_weights(folder: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """An mmray export's or a transformers ``CLIPModel`` folder's weights, under mmray's keys."""
    meta = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    if meta.get("format") == "mmray-model" or meta.get("model_type") == "mmray":
        return "mmray", weights  # an export, or its transformers remote-code folder
    if meta.get("model_type") == "clip":
        return "hf-clip", {_hf_key(k): _hf_value(k, v) for k, v in weights.items()}
    raise ConfigError(
        f"init.from: {folder} is neither an mmray model nor a transformers CLIPModel folder "
        f"(config.json: format {meta.get('format')!r}, model_type {meta.get('model_type')!r})"
    )


def _hf_key(key: str) -> str:
    for hf, ours in HF_PREFIXES.items():
        if key.startswith(hf):
            return ours + key.removeprefix(hf)
    return key


def _hf_value(key: str, value: torch.Tensor) -> torch.Tensor:
    # CLIPModel's logit_scale is 0-dim; mmray keeps scalars as shape-(1,) (see ImageTextModel)
    return value.reshape(1) if key == "logit_scale" else value


@functools.cache
def _resolve(source: str) -> Any:
    """The source's ``ModelRef`` (its local folder downloaded once per process: a job checks
    the warm start before work starts, then reads it)."""
    from mmcore.tracking import check_model, resolve_model

    try:
        check_model(source)  # a clear message for a source that is not there
        ref = resolve_model(source)
    except ConfigError as e:
        raise ConfigError(f"init.from: {e}") from e
    return ref
