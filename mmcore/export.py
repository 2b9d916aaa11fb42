"""Save and load models: ``model.safetensors`` + ``config.json`` (never pickle for weights).

save_model(model, "out/model")      # a local export folder, the model URI's simplest form
model = load_model("out/model")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmcore.config import from_dict, to_dict
from mmcore.models.model import ImageTextModel, ModelConfig, build_model

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "mmray-model"


def save_model(model: ImageTextModel, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": 1, "model": to_dict(model.cfg)}
    (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> ImageTextModel:
    """Build the model from ``config.json`` and load its safetensors weights (strict)."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} is not an mmray model export (format {meta.get('format')!r})")
    model = build_model(from_dict(ModelConfig, meta["model"]))
    model.load_state_dict(load_file(folder / WEIGHTS, device=str(device)), strict=True)
    return model.eval()
