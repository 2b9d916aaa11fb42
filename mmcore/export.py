"""Save and load model folders: ``model.safetensors`` + ``config.json`` (never pickle for
weights), and the Hugging Face CLIP export. Model URIs resolve in ``mmcore.tracking``.

save_model(model, "out/model")      # a local export folder, the model URI's simplest form
model = load_model("out/model")
export_hf(model, "hf-model/")       # transformers loads it (CLIPModel, or AutoModel with
                                    # trust_remote_code=True), with its CLIPProcessor
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mmcore import storage
from mmcore.config import ConfigError, from_dict, to_dict

if TYPE_CHECKING:  # torch and the model code load where a model is saved or built, so that
    import torch  # checking a folder (jobs do it before any work) costs no seconds of imports

    from mmcore.models.model import ImageTextModel, ModelConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "mmray-model"


def save_model(model: ImageTextModel, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": 1, "model": to_dict(model.cfg)}
    if model.objectives is not None:
        meta["objectives"] = sorted(model.objectives)
    (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def find_export(root: str | Path) -> Path:
    """The export folder in ``root`` (itself or below it: MLflow nests it in artifacts)."""
    root = Path(root)
    found = [p.parent for p in sorted(root.rglob(CONFIG)) if (p.parent / WEIGHTS).exists()]
    if not found:
        raise ConfigError(f"{root} holds no mmray model export ({CONFIG} + {WEIGHTS})")
    return found[0]


def check_folder(folder: str | Path) -> None:
    """``ConfigError`` unless ``folder`` (local, or a URI such as ``s3://bucket/model``) holds
    an export (cheap: reads no weights)."""
    if not all(storage.is_file(storage.join(folder, name)) for name in (CONFIG, WEIGHTS)):
        raise ConfigError(
            f"model {folder}: {storage.absolute(folder)} holds no {CONFIG} + {WEIGHTS}; give a "
            "model folder (local or in object storage), runs:/RUN_ID/model or models:/NAME@ALIAS"
        )


def local_folder(folder: str | Path) -> Path:
    """The export as a local folder: itself, or for a URI a copy in ``storage.cached``, keyed
    by the URI and its weights' size and time (a model written again there is fetched again)."""
    check_folder(folder)
    if not storage.is_uri(str(folder)):
        return Path(storage.absolute(folder))
    weights = storage.info(storage.join(folder, WEIGHTS))

    def fetch(tmp: Path) -> Path:
        storage.download_dir(str(folder), tmp)
        return tmp

    return storage.cached(f"{storage.absolute(folder)} {weights.size} {weights.mtime_ns}", fetch)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> ImageTextModel:
    """Build the model from an export folder's ``config.json`` and load its safetensors
    weights (strict). A model URI (``runs:/``, ``models:/``): ``mmcore.tracking.load``."""
    from safetensors.torch import load_file

    from mmcore.models.model import build_model

    model = build_model(read_config(folder))
    model.load_state_dict(load_file(Path(folder) / WEIGHTS, device=str(device)), strict=True)
    objectives = json.loads((Path(folder) / CONFIG).read_text()).get("objectives")
    model.objectives = frozenset(objectives) if objectives is not None else None
    return model.eval()


def read_config(folder: str | Path) -> ModelConfig:
    """The model config of a local export folder (reads no weights)."""
    from mmcore.models.model import ModelConfig

    check_folder(folder)
    meta = json.loads((Path(folder) / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{folder} is not an mmray model export (format {meta.get('format')!r})")
    return from_dict(ModelConfig, meta["model"])


def export_hf(model: ImageTextModel, folder: str | Path) -> Path:
    """Write a folder transformers loads, with its ``CLIPProcessor``: ``CLIPModel`` itself
    for late-fusion models with CLIP-style towers (``vision.stem=patch``,
    ``text.kind=transformer``); for every other model the encoders as an ``AutoModel`` with
    its modelling code in the folder (``trust_remote_code=True``; mmray not needed). Both
    give the same embeddings as ``model``."""
    cfg = model.cfg
    folder = Path(folder)
    if model.scores_pairs or cfg.text.kind != "transformer" or cfg.vision.stem != "patch":
        _export_remote_code(model, folder)
    else:
        _export_clip(model, folder)
    _save_processor(model, folder)
    return folder


def _export_clip(model: ImageTextModel, folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=model.text.model.config.to_dict(),
        vision_config=model.vision.model.config.to_dict(),
        projection_dim=model.cfg.embed_dim,
        logit_scale_init_value=float(model.logit_scale.detach()[0]),
    )
    hf = CLIPModel(config)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision.model."):  # transformers 5: no vision_model. inside
            state["vision_model." + key.removeprefix("vision.model.")] = value
        elif key.startswith("text.model."):
            state["text_model." + key.removeprefix("text.model.")] = value
        elif key == "logit_scale":
            state[key] = value.reshape(())  # a shape-(1,) parameter here, 0-dim in CLIPModel
        elif key != "logit_bias":
            state[key] = value
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(folder)


def _export_remote_code(model: ImageTextModel, folder: Path) -> None:
    """``mmcore/hf_remote/modeling_mmray.py`` (registered for the auto classes, so
    ``save_pretrained`` copies it and writes its ``auto_map``) and the encoders' weights
    under mmray's names; a fusion module and its heads stay behind (embeddings need none)."""
    from mmcore.hf_remote.modeling_mmray import MmrayConfig, MmrayModel
    from mmcore.warmstart import group_of

    cfg = model.cfg
    MmrayConfig.register_for_auto_class()
    MmrayModel.register_for_auto_class("AutoModel")
    config = MmrayConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=model.text.model.config.to_dict(), text_kind=cfg.text.kind,
        stem=cfg.vision.stem, stem_channels=cfg.vision.stem_channels, embed_dim=cfg.embed_dim,
        architectures=["MmrayModel"], mmray=to_dict(cfg),
    )  # fmt: skip
    hf = MmrayModel(config)
    encoders = {"vision", "text", "projections"}
    state = {k: v for k, v in model.state_dict().items() if group_of(k) in encoders}
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(folder)


def _save_processor(model: ImageTextModel, folder: Path) -> None:
    # The PIL backend by name: the name CLIPImageProcessor means torchvision's where it is
    # installed and warns where it is not; PIL's resize is the one mmray's pixels equal.
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    from mmcore.data.transforms import MEAN, STD
    from mmcore.models.towers import tokenizer

    size = model.cfg.vision.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=MEAN.tolist(), image_std=STD.tolist(),
        ),
        tokenizer=tokenizer(),
    )  # fmt: skip
    processor.tokenizer.model_max_length = model.cfg.text.context_length
    processor.save_pretrained(folder)
