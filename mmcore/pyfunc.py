"""The MLflow pyfunc flavour of an mmray model (imported only through ``mmcore.tracking``).

Input: a DataFrame with a ``text`` column and/or an ``image`` column (base64-encoded image
bytes); empty cells are skipped. Output: ``text_embedding`` / ``image_embedding`` columns
(unit-norm lists). With ``params={"labels": [...]}``, zero-shot probabilities over the labels
for each image instead (``probs``, in label order). With ``params={"task": "caption"}`` (and
``num_beams``, ``max_new_tokens``: by default 1 and the task's own, 20 for a caption and 8 for
an answer, as in Serve), each image's generated ``caption`` and its ``score``, from
a model trained with the caption objective; with ``params={"task": "vqa"}``, the ``answer``
(and ``score``) to each row's ``question`` about its image, from a model trained with the vqa
objective. The weights stay a safetensors export in
the model's artifacts; MLflow keeps ``mmcore/pyfunc_code.py``, which builds this wrapper, as
the model's code (no pickling).
"""

from __future__ import annotations

import dataclasses

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

INPUT_EXAMPLE = pd.DataFrame({"text": ["a photo of a red circle"]})  # → its embedding
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "text", required=False),
            ColSpec("string", "image", required=False),
            ColSpec("string", "question", required=False),
        ]  # fmt: skip
    ),
    outputs=Schema([ColSpec("string", "text_embedding", required=False)]),
    params=ParamSchema(
        [
            ParamSpec("labels", "string", default=[], shape=(-1,)),
            ParamSpec("task", "string", default="embed"),  # or "caption", "vqa"
            ParamSpec("num_beams", "long", default=1),
            ParamSpec("max_new_tokens", "long", default=0),  # 0: the task's (20; answers 8)
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
        task = params.get("task", "embed")
        if task in ("caption", "vqa"):
            return self._generate(task, model_input, images, params, out)
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

    def _generate(
        self, task: str, frame: pd.DataFrame, images: pd.Series, params: dict, out: pd.DataFrame
    ) -> pd.DataFrame:
        """Each image's caption, or the answer to its row's question, and the score."""
        from mmcore.tasks import ANSWER, GenerationConfig, cannot

        if reason := cannot(self.engine.model, task):
            raise ValueError(reason)
        base = ANSWER if task == "vqa" else GenerationConfig()
        given = {k: int(params[k]) for k in ("num_beams", "max_new_tokens") if params.get(k)}
        cfg = dataclasses.replace(base, **given)
        if task == "caption":
            texts = self.engine.caption(list(images.values), cfg)
        else:
            questions = frame.get("question", pd.Series(dtype=object)).reindex(images.index)
            if questions.isna().any():
                raise ValueError("task vqa: every row with an image needs a question")
            texts = self.engine.answer(list(images.values), list(questions.values), cfg)
        out.loc[images.index, "answer" if task == "vqa" else "caption"] = [t for t, _ in texts]
        out.loc[images.index, "score"] = [score for _, score in texts]
        return out


def _images(frame: pd.DataFrame) -> pd.Series:
    """The ``image`` column decoded with the Serve API's checks (pixel count on the header)."""
    from mmcore.serving import Limits, decode_image

    column = frame.get("image", pd.Series(dtype=object)).dropna()
    return column.map(lambda b64: decode_image(b64, Limits()))
