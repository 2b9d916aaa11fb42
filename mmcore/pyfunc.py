"""The MLflow pyfunc flavour of an mmray model (imported only through ``mmcore.tracking``).

Input: a DataFrame with a ``text`` column and/or an ``image`` column (base64-encoded image
bytes); empty cells are skipped. Output: ``text_embedding`` / ``image_embedding`` columns
(unit-norm lists). With ``params={"labels": [...]}``, zero-shot probabilities over the labels
for each image instead (``probs``, in label order). With ``params={"task": "caption"}`` (and
``num_beams``, ``max_new_tokens``), each image's generated ``caption`` and its ``score``, from
a model with a caption decoder. The weights stay a safetensors export in
the model's artifacts; only this small wrapper class goes through MLflow's pickling.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

INPUT_EXAMPLE = pd.DataFrame({"text": ["a photo of a red circle"]})  # → its embedding
SIGNATURE = ModelSignature(
    inputs=Schema(
        [ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)]
    ),
    outputs=Schema([ColSpec("string", "text_embedding", required=False)]),
    params=ParamSchema(
        [
            ParamSpec("labels", "string", default=[], shape=(-1,)),
            ParamSpec("task", "string", default="embed"),  # or "caption"
            ParamSpec("num_beams", "long", default=1),
            ParamSpec("max_new_tokens", "long", default=20),
        ]
    ),  # fmt: skip
)


class ImageTextPyfunc(mlflow.pyfunc.PythonModel):
    """A thin wrapper: every score comes from ``mmcore.inference.Engine``, as in Serve."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from mmcore.export import load_model
        from mmcore.inference import Engine

        self.engine = Engine(load_model(context.artifacts["model"]))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        out = pd.DataFrame(index=model_input.index)
        images = _images(model_input)
        params = params or {}
        if params.get("task", "embed") == "caption":
            from mmcore.generate import GenerationConfig

            given = {k: int(params[k]) for k in ("num_beams", "max_new_tokens") if k in params}
            cfg = GenerationConfig(**given)
            captions = self.engine.caption(list(images.values), cfg)
            out.loc[images.index, "caption"] = [text for text, _ in captions]
            out.loc[images.index, "score"] = [score for _, score in captions]
            return out
        labels = params.get("labels")
        if labels is not None and len(labels):
            probs = self.engine.classify(list(images.values), list(labels))
            out.loc[images.index, "probs"] = pd.Series(probs.tolist(), index=images.index)
            return out
        if len(images):
            emb = self.engine.embed_images(list(images.values))
            out["image_embedding"] = pd.Series(emb.tolist(), index=images.index)
        texts = model_input.get("text", pd.Series(dtype=object)).dropna()
        if len(texts):
            emb = self.engine.embed_texts(list(texts.values))
            out["text_embedding"] = pd.Series(emb.tolist(), index=texts.index)
        return out


def _images(frame: pd.DataFrame) -> pd.Series:
    """The ``image`` column decoded with the Serve API's checks (pixel count on the header)."""
    from mmcore.serving import Limits, decode_image

    column = frame.get("image", pd.Series(dtype=object)).dropna()
    return column.map(lambda b64: decode_image(b64, Limits()))
