from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmcore.eval.retrieval import recall_at_k
from mmcore.eval.zeroshot import accuracy, class_prompts, image_folder, zeroshot_classifier


def test_recall_at_k_counts_ranks_both_ways() -> None:
    # texts are the unit axes, so scores[i, j] = image[i][j]
    image = torch.tensor(
        [[0.447, 0.894, 0, 0], [0, 0.8, 0.6, 0], [0, 0, 0.8, 0.6], [0, 0, 0.894, 0.447]]
    )
    r = recall_at_k(image @ torch.eye(4).T, ks=(1, 2, 10))
    assert r["i2t_r@1"] == 0.5  # images 0 and 3 score another text above their own
    assert r["i2t_r@2"] == 1.0 and r["i2t_r@10"] == 1.0
    assert r["t2i_r@1"] == 0.25  # only text 0 has its own image on top
    assert r["t2i_r@2"] == 1.0


def test_zeroshot_classifier_averages_templates_and_accuracy() -> None:
    vocab = {
        "a red.": [1.0, 0, 0],
        "the red.": [0.8, 0.2, 0],
        "a blue.": [0, 1.0, 0],
        "the blue.": [0, 0.9, 0.1],
    }

    def encode(texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.tensor([vocab[t] for t in texts]), dim=-1)

    prompts = class_prompts(["red", "blue"], ["a {}.", "the {}."])
    clf = zeroshot_classifier(encode(prompts), n_classes=2)
    assert clf.shape == (2, 3) and torch.allclose(clf.norm(dim=1), torch.ones(2))
    images = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.1, 1.0, 0], [0.9, 0.0, 0.1]]), dim=-1)
    metrics = accuracy(images @ clf.T, torch.tensor([0, 1, 1]))
    assert metrics == {"top1": pytest.approx(2 / 3), "top5": 1.0}


def test_image_folder(tmp_path: Path) -> None:
    for cls in ("square", "circle"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "0.png")
    (tmp_path / "circle" / "notes.txt").write_text("not an image")
    paths, labels, classes = image_folder(tmp_path)
    assert classes == ["circle", "square"] and labels == [0, 1] and len(paths) == 2
    with pytest.raises(ValueError, match="0 class sub-folders"):
        image_folder(tmp_path / "circle")
    (tmp_path / "one" / "square").mkdir(parents=True)  # top-1 over one class: always right
    with pytest.raises(ValueError, match="1 class sub-folders, zero-shot needs two or more"):
        image_folder(tmp_path / "one")
    (tmp_path / "one" / "circle").mkdir()  # no images: numpy's concatenate error before
    with pytest.raises(ValueError, match="no images"):
        image_folder(tmp_path / "one")
