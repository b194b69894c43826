"""data.label_repeat: oversampling whole classes by integer factors (visar.data.label_repeat)."""
import pytest
import torch

from visar.data.label_repeat import LabelRepeat, item_labels, resolve_repeats
from visar.data.shapes import CLASSES, ShapesDataset
from visar.train.config import ConfigError, load_config
from visar.train.trainer import StepBatches, build_dataset


def test_shapes_classes_are_listed_by_their_factor_and_items_are_unchanged():
    base = ShapesDataset(size=8, length=30)
    ds = LabelRepeat(base, {"diamond": 2, 7: 3})
    # 3 items of each class; diamond (6) listed twice, hexagon (7) three times
    assert len(ds) == 30 + 3 * 1 + 3 * 2
    labels = ds.item_labels()
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == [3, 3, 3, 3, 3, 3, 6, 9, 3, 3]
    assert ds.classes == CLASSES and ds.num_classes == 10
    for i in (0, 5, len(ds) - 1):
        item = ds[i]
        ref = base[int(ds.positions[i])]
        assert item["label"] == labels[i] == ref["label"]
        assert torch.equal(item["image"], ref["image"]) and item["caption"] == ref["caption"]
    # the batched read maps indices the same way as item reads
    idx = [len(ds) - 1, 0, 20, 21, 22]
    batch = ds.__getitems__(idx)
    assert [b["label"] for b in batch] == [ds[i]["label"] for i in idx]
    assert all(torch.equal(b["image"], ds[i]["image"]) for b, i in zip(batch, idx))
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([0, len(ds)])


def test_one_epoch_of_step_batches_sees_each_repeated_item_k_times():
    ds = LabelRepeat(ShapesDataset(size=8, length=40), {"heart": 4})
    sampler = StepBatches(len(ds), batch_size=len(ds), grad_accum=1, rank=0, world=1, seed=3, start=0, steps=1)
    seen = torch.tensor([int(ds.positions[i]) for batch in sampler for i in batch])
    per_item = torch.bincount(seen, minlength=40)
    assert all(per_item[i] == (4 if i % 10 == 8 else 1) for i in range(40))


def test_labels_are_read_from_a_labels_list_of_one_label_per_item():
    class Labelled(torch.utils.data.Dataset):
        labels, classes = [0, 1, 1, 0], ["cat", "dog"]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"label": self.labels[i]}

    ds = LabelRepeat(Labelled(), {"cat": 5})
    assert item_labels(Labelled()).tolist() == [0, 1, 1, 0]
    assert len(ds) == 4 + 2 * 4 and ds.item_labels().tolist().count(0) == 10


def test_a_labels_list_of_the_wrong_length_is_refused():
    class Doubled(torch.utils.data.Dataset):
        labels = [0, 1, 1]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"label": self.labels[i % 3]}

    with pytest.raises(ValueError, match="gave \\(3,\\) labels for 6 items"):
        item_labels(Doubled())


@pytest.mark.parametrize("repeats, classes, match", [
    ({6: 0}, CLASSES, "whole repeat factor >= 1"),
    ({6: 1.5}, CLASSES, "whole repeat factor >= 1"),
    ({6: True}, CLASSES, "whole repeat factor >= 1"),
    ({"octagon": 2}, CLASSES, "'octagon' is not a class of this dataset; classes: circle"),
    ({"diamond": 2}, None, "has no class names; use the class index"),
    ({10: 2}, CLASSES, r"not a class index of this dataset \(0 .. 9\)"),
    ({-1: 2}, None, "not a class index"),
    ({"diamond": 2, 6: 3}, CLASSES, "names class 6 twice"),
    ({1.0: 2}, CLASSES, "must be a class index or a class name"),
    ([6, 2], CLASSES, "must map class -> repeat factor"),
])
def test_bad_repeats_are_named(repeats, classes, match):
    with pytest.raises(ValueError, match=match):
        resolve_repeats(repeats, classes)


def test_a_class_no_item_has_and_a_dataset_without_labels_are_refused():
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] that no item"):
        LabelRepeat(ShapesDataset(size=8, length=3), {3: 2})

    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {}

    with pytest.raises(ValueError, match="carry no class labels"):
        LabelRepeat(NoLabels(), {0: 2})



def test_the_config_key_is_checked_at_load_and_builds_the_repeated_dataset():
    cfg = load_config(None, ["data.label_repeat={hexagon: 2, 8: 3}"], data={
        "task": "tokenizer", "model": {"cls": "visar.tokenizers.vq:VQTokenizer"},
        "data": {"kind": "shapes", "size": 8, "length": 20}, "train": {"output_dir": "/tmp/unused"}})
    ds = build_dataset(cfg.data)
    assert isinstance(ds, LabelRepeat) and len(ds) == 20 + 2 * 1 + 2 * 2
    with pytest.raises(ConfigError, match="data.label_repeat key 'hexagonn' is not a class"):
        load_config(None, ["data.label_repeat={hexagonn: 2}"], data={
            "task": "tokenizer", "model": {"cls": "visar.tokenizers.vq:VQTokenizer"},
            "data": {"kind": "shapes", "size": 8}, "train": {"output_dir": "/tmp/unused"}})
    with pytest.raises(ConfigError, match="must be dict"):
        load_config(None, ["data.label_repeat=3"], data={
            "task": "tokenizer", "model": {"cls": "visar.tokenizers.vq:VQTokenizer"},
            "data": {"kind": "shapes", "size": 8}, "train": {"output_dir": "/tmp/unused"}})
    with pytest.raises(ConfigError, match=r"\[7\] must be a whole repeat factor"):
        load_config(None, ["data.label_repeat={7: 0}"], data={
            "task": "tokenizer", "model": {"cls": "visar.tokenizers.vq:VQTokenizer"},
            "data": {"kind": "shapes", "size": 8}, "train": {"output_dir": "/tmp/unused"}})


def test_an_image_folder_with_flips_is_oversampled_by_class_name(tmp_path):
    from PIL import Image

    from visar.data.folder import ImageFolderDataset

    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    base = ImageFolderDataset(tmp_path, size=8, flip=True)
    ds = LabelRepeat(base, {"cat": 3})
    assert len(ds) == 10 + 2 * 2 * 2
    labels = ds.item_labels()
    assert labels.tolist().count(base.classes.index("cat")) == 12
    assert all(ds[i]["label"] == labels[i] for i in range(len(ds)))
