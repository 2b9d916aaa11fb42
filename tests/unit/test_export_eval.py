"""Export to Hugging Face CLIP (parity), and the eval commands on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from mmcore.eval.run import zeroshot_eval
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, accuracy, image_folder
from mmcore.export import load_model, save_model
from mmcore.inference import Engine
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig
from mmcore.warmstart import InitConfig, plan
from pipelines import evaluate, export

LATE = ModelConfig(text=TextConfig(kind="transformer"))


def features(out) -> torch.Tensor:
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(LATE), tmp_path_factory.mktemp("m") / "model")


def test_hf_export_gives_the_same_embeddings_and_zeroshot_accuracy(
    model_dir, sample_dir, tmp_path
) -> None:
    assert (
        export.main(["--model", str(model_dir), "--format", "hf", "--output", str(tmp_path / "hf")])
        == 0
    )
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    processor = CLIPProcessor.from_pretrained(tmp_path / "hf")
    folder = sample_dir / "zeroshot" / "colour"
    paths, labels, classes = image_folder(folder)
    images = [Image.open(p).convert("RGB") for p in paths]
    prompts = [t.format(c) for c in classes for t in DEFAULT_TEMPLATES]
    with torch.no_grad():
        img = features(hf.get_image_features(**processor(images=images, return_tensors="pt")))
        tok = processor(
            text=prompts, return_tensors="pt", padding="max_length", max_length=32, truncation=True
        )
        txt = features(
            hf.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        )
    clf = F.normalize(txt.view(len(classes), len(DEFAULT_TEMPLATES), -1).mean(1), dim=-1)
    theirs = accuracy(img @ clf.T, torch.tensor(labels))
    model = load_model(model_dir)
    ours = zeroshot_eval(model, folder)
    assert ours["top1"] == theirs["top1"] and ours["top5"] == theirs["top5"]

    # The same pixels and the same embeddings, input by input.
    engine = Engine(model)
    hf_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(engine.transforms.pixels(images), hf_pixels)
    np.testing.assert_allclose(engine.embed_images(images), img.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(engine.embed_texts(prompts), txt.numpy(), rtol=0, atol=2e-6)


# Loads an exported folder with mmray unimportable: transformers' AutoModel (remote code)
# and CLIPProcessor; prints the embeddings of the sample images and captions as JSON.
LOAD_WITHOUT_MMRAY = """
import json, sys
from pathlib import Path
for name in ("mmcore", "pipelines"):
    sys.modules[name] = None  # importing them now raises ImportError
import torch
from PIL import Image
from transformers import AutoModel, CLIPProcessor
folder, images, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = CLIPProcessor.from_pretrained(folder, trust_remote_code=True)
pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
tokens = processor(text=texts, padding="max_length", max_length=32, truncation=True,
                   return_tensors="pt")
with torch.no_grad():
    out = model(pixel_values=pixels["pixel_values"], input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"])
print(json.dumps({k: v.tolist() for k, v in out.items()}))
"""


@pytest.mark.parametrize("cfg", [
    ModelConfig(vision=VisionConfig(stem="conv")),  # the tiny recipe: conv stem, MiniLM
    ModelConfig(fusion="hybrid", text=TextConfig(kind="transformer")),  # a fusion variant
], ids=["conv-minilm", "hybrid"])  # fmt: skip
def test_every_other_model_exports_for_automodel_with_remote_code(
    cfg: ModelConfig, sample_dir, tmp_path
) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    src = save_model(model, tmp_path / "model")
    assert (
        export.main(["--model", str(src), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    )
    assert (tmp_path / "hf" / "modeling_mmray.py").exists()
    paths, _, _ = image_folder(sample_dir / "zeroshot" / "shape")
    images, texts = [str(p) for p in paths[::40]], ["a red circle", "two blue squares", "a"]
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MMRAY, str(tmp_path / "hf"),
                          json.dumps(images), json.dumps(texts)], capture_output=True, text=True,
                         cwd=tmp_path, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    engine = Engine(model)
    ours_img = engine.embed_images([Image.open(p).convert("RGB") for p in images])
    ours_txt = engine.embed_texts(texts)
    np.testing.assert_allclose(theirs["image_embeds"], ours_img, rtol=0, atol=1e-5)
    np.testing.assert_allclose(theirs["text_embeds"], ours_txt, rtol=0, atol=1e-5)
    scale = model.scales()[0].item()
    np.testing.assert_allclose(theirs["logits_per_image"], scale * ours_img @ ours_txt.T,
                               rtol=0, atol=1e-3)  # fmt: skip
    # The folder is also a warm start: the same weights back into mmray
    warm = plan(InitConfig(source=str(tmp_path / "hf"), modules=["towers", "projections"]),
                build_model(cfg))  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in warm.state.items())


def test_eval_commands_print_one_json_line(model_dir, sample_dir, tmp_path, capsys) -> None:
    args = [
        "zeroshot",
        "--model",
        str(model_dir),
        "--image-folder",
        str(sample_dir / "zeroshot" / "shape"),
    ]
    assert evaluate.main([*args, "--template", "a {} shape"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_classes"] == 5 and 0 <= out["top1"] <= out["top5"] <= 1

    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:  # a small shard set
        for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
            pixels = np.full((64, 64, 3), 40 * i, np.uint8)
            sink.write(
                {"__key__": f"{i:09d}", "jpg": Image.fromarray(pixels), "txt": f"a {colour} square"}
            )
    assert evaluate.main(["retrieval", "--model", str(model_dir), "--data", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_pairs"] == 6 and out["i2t_r@10"] == 1.0 and 0 <= out["i2t_r@1"] <= 1

    assert (
        evaluate.main(["zeroshot", "--model", str(tmp_path / "nope"), "--image-folder", "x"]) == 2
    )
    assert "nope holds no config.json + model.safetensors" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # a folder without shards: a message, not a traceback
    assert (
        evaluate.main(["retrieval", "--model", str(model_dir), "--data", str(tmp_path / "empty")])
        == 2
    )
    assert "no .tar shards in" in capsys.readouterr().err
    assert evaluate.main([*args, "--template", "no placeholder"]) == 2
    assert "every --template needs a {}" in capsys.readouterr().err
    # Counts below their least: 0 used to mean all pairs, -1 all but the last image.
    data = ["--model", str(model_dir), "--data", str(tmp_path)]
    for task, flag, value, least in [("retrieval", "--limit", "1", 2),
                                     ("retrieval", "--shortlist", "0", 1),
                                     ("caption", "--max-pairs", "0", 1),
                                     ("vqa", "--max-pairs", "-1", 1)]:  # fmt: skip
        assert evaluate.main([task, *data, flag, value]) == 2
        assert f"{flag} must be >= {least}" in capsys.readouterr().err
