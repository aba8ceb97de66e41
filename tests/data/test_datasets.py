"""vmoe.data: albumentations pipelines, RandAugment, the digits data module, YAML configuration."""

import dataclasses

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vmoe.data import (
    DEFAULT_TRAIN,
    OPS,
    ArrayDataset,
    DigitsDataModule,
    EvalTransformConfig,
    RandAugment,
    TrainTransformConfig,
    build_datamodule,
    build_eval_transform,
    build_train_transform,
    load_digits_uint8,
)
from vmoe.data.datasets import seed_worker

MEAN = STD = (0.5, 0.5, 0.5)
MAGNITUDE_FREE = {"Identity", "AutoContrast", "Equalize", "Invert"}


def _image(size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _normalized(img):
    return torch.from_numpy((img.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)


# ---------------------------------------------------------------- transforms
def test_train_pipeline_shapes_and_draws_differ():
    tf = build_train_transform(24, TrainTransformConfig(), MEAN, STD, seed=0)
    img = _image(40)
    a, b = tf(image=img)["image"], tf(image=img)["image"]
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert not torch.equal(a, b)  # random crop/flip/RandAugment draw anew each call


def test_train_pipeline_deterministic_under_seed():
    img = _image(40)
    runs = []
    for _ in range(2):
        tf = build_train_transform(
            24, TrainTransformConfig(randaugment_magnitude=10), MEAN, STD, seed=123
        )
        runs.append(torch.stack([tf(image=img)["image"] for _ in range(4)]))
    assert torch.equal(runs[0], runs[1])
    other = build_train_transform(
        24, TrainTransformConfig(randaugment_magnitude=10), MEAN, STD, seed=124
    )
    assert not torch.equal(runs[0], torch.stack([other(image=img)["image"] for _ in range(4)]))


def test_eval_pipeline_is_deterministic_and_center_crops():
    img = _image(32)
    tf = build_eval_transform(16, EvalTransformConfig(crop_pct=0.5), MEAN, STD)
    a, b = tf(image=img)["image"], tf(image=img)["image"]
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    # crop_pct 0.5: the short side is resized to 16 / 0.5 = 32 (unchanged), then the centre 16x16
    torch.testing.assert_close(a, _normalized(img[8:24, 8:24]))


def test_flip_is_optional():
    img = _image(16)
    exact = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment_num_ops=0)  # crop = whole image
    never = build_train_transform(
        16, TrainTransformConfig(hflip_prob=0.0, **exact), MEAN, STD, seed=0
    )
    always = build_train_transform(
        16, TrainTransformConfig(hflip_prob=1.0, **exact), MEAN, STD, seed=0
    )
    for _ in range(3):
        torch.testing.assert_close(never(image=img)["image"], _normalized(img))
        torch.testing.assert_close(always(image=img)["image"], _normalized(img[:, ::-1]))


@pytest.mark.parametrize("name", sorted(set(OPS) - MAGNITUDE_FREE))
def test_randaugment_magnitude_zero_is_identity_and_ten_changes(name):
    img = _image(24, seed=1)
    weak = RandAugment(num_ops=1, magnitude=0, ops=[name], p=1.0)
    strong = RandAugment(num_ops=1, magnitude=10, ops=[name], p=1.0)
    np.testing.assert_array_equal(weak(image=img)["image"], img)
    out = strong(image=img)["image"]
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 1.0


def test_randaugment_picks_n_distinct_ops_deterministically():
    ops = ["Rotate", "ShearX", "Posterize", "Contrast", "Equalize"]
    picks = []
    for seed in (7, 7, 8):
        ra = RandAugment(num_ops=3, magnitude=6, ops=ops)
        ra.set_random_seed(seed)
        seq = []
        for _ in range(10):
            params = ra.get_params()["ops"]
            names = [n for n, _ in params]
            assert len(names) == 3 and len(set(names)) == 3 and set(names) <= set(ops)
            seq.append(params)
        picks.append(seq)
    assert picks[0] == picks[1] and picks[0] != picks[2]
    # magnitude 6 -> Rotate +-18 degrees, Posterize 8 - int(2.4) = 6 bits, Contrast factor 1 +- 0.54
    strengths = {n: s for seq in picks for params in seq for n, s in params}
    assert abs(abs(strengths["Rotate"]) - 18.0) < 1e-9 and strengths["Posterize"] == 6
    assert abs(abs(strengths["Contrast"] - 1.0) - 0.54) < 1e-9


def test_randaugment_num_ops_zero_and_grayscale():
    gray = _image(16)[..., :1].copy()
    np.testing.assert_array_equal(RandAugment(num_ops=0)(image=gray)["image"], gray)
    out = RandAugment(num_ops=3, magnitude=10, ops=["Color", "Rotate", "Sharpness"])(image=gray)[
        "image"
    ]
    assert out.shape == gray.shape


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(ops=["Rotate", "Blur"]), "Blur"),
        (dict(magnitude=11), "magnitude"),
        (dict(num_ops=3, ops=["Rotate", "ShearX"]), "num_ops"),
        (dict(fill=300), "fill"),
    ],
)
def test_randaugment_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RandAugment(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, word",
    [
        (TrainTransformConfig, dict(scale=(0.9, 0.1)), "scale"),
        (TrainTransformConfig, dict(hflip_prob=1.5), "hflip_prob"),
        (TrainTransformConfig, dict(randaugment_ops=["Nope"]), "Nope"),
        (TrainTransformConfig, dict(interpolation="fancy"), "interpolation"),
        (EvalTransformConfig, dict(crop_pct=0.0), "crop_pct"),
    ],
)
def test_transform_configs_reject_bad_values(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(**kwargs)


def test_randaugment_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        RandAugment(num_ops=1, ops=["Rotate"])(image=np.zeros((8, 8, 3), np.float32))


# ---------------------------------------------------------------- digits
def test_digits_split_sizes_disjoint_and_stratified():
    dm = DigitsDataModule()
    train, val, test = dm.split_indices()
    assert (len(train), len(val), len(test)) == (1437, 180, 180)
    assert (
        len(np.intersect1d(train, val))
        == len(np.intersect1d(train, test))
        == len(np.intersect1d(val, test))
        == 0
    )
    _, labels = load_digits_uint8(channels=1)
    class_counts = np.bincount(labels, minlength=10)
    for part in (val, test):
        counts = np.bincount(labels[part], minlength=10)
        assert np.all(np.abs(counts - class_counts * 0.1) <= 1.0), counts


def test_digits_setup_builds_its_sets_from_the_split_indices():
    """The images setup() puts in each set are exactly those of split_indices() (80/10/10 of
    1,797, stratified), the test set disjoint from training."""
    dm = DigitsDataModule(channels=3)
    dm.setup("fit")
    images, labels = load_digits_uint8(3)
    train, val, test = dm.split_indices()
    assert (len(train), len(val), len(test)) == (1437, 180, 180)
    assert set(test).isdisjoint(train) and set(val).isdisjoint(train) and set(test).isdisjoint(val)
    for data, index in ((dm.train_set, train), (dm.val_set, val), (dm.test_set, test)):
        assert np.array_equal(data.images, images[index]) and np.array_equal(
            data.labels, labels[index]
        )
        assert np.array_equal(
            dm.indices[
                {id(dm.train_set): "train", id(dm.val_set): "val", id(dm.test_set): "test"}[
                    id(data)
                ]
            ],
            index,
        )
    train_images = {dm.train_set.images[i].tobytes() for i in range(len(train))}
    assert (
        sum(dm.test_set.images[i].tobytes() in train_images for i in range(len(test))) < 5
    )  # few duplicates


def test_digits_split_is_deterministic_per_seed():
    a = DigitsDataModule(split_seed=0).split_indices()
    b = DigitsDataModule(split_seed=0).split_indices()
    c = DigitsDataModule(split_seed=1).split_indices()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])


@pytest.mark.parametrize("img_size, channels", [(16, 3), (24, 1)])
def test_digits_batches(img_size, channels):
    dm = DigitsDataModule(img_size=img_size, channels=channels, batch_size=32)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.img_size == img_size
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (32, channels, img_size, img_size) and x.dtype == torch.float32
        assert (
            y.shape == (32,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
        )
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean = std = 0.5


def test_digits_train_augments_and_eval_is_repeatable():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    x1, y1 = dm.train_set[0]
    x2, y2 = dm.train_set[0]
    assert y1 == y2 and not torch.equal(x1, x2)
    v1 = torch.cat([x for x, _ in dm.val_dataloader()])
    v2 = torch.cat([x for x, _ in dm.val_dataloader()])
    assert v1.shape == (180, 3, 16, 16) and torch.equal(v1, v2)


def test_digits_training_batches_repeat_under_seed_everything():
    batches = []
    for _ in range(2):
        L.seed_everything(3, verbose=False)
        dm = DigitsDataModule(batch_size=16)
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


def test_workers_get_distinct_augmentation_streams():
    # 4 copies of one image: without reseeding, both forked workers would draw the same crops
    images = np.repeat(load_digits_uint8()[0][:1], 4, axis=0)
    tf = build_train_transform(
        16, TrainTransformConfig(hflip_prob=0.0, scale=(0.3, 1.0)), MEAN, STD, seed=0
    )
    ds = ArrayDataset(images, np.zeros(4, np.int64), tf)
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    first = [x for x, _ in loader]
    assert not torch.equal(first[0], first[1])  # item 0 from worker 0, item 1 from worker 1


def test_ddp_ranks_draw_different_augmentations():
    from types import SimpleNamespace

    img = _image(24)
    outs = []
    for rank in (0, 0, 1):
        dm = DigitsDataModule()
        dm.trainer = SimpleNamespace(global_rank=rank)  # what a DDP Trainer attaches
        torch.manual_seed(0)  # seed_everything gives every rank the same torch seed
        tf = dm.build_train_transform()
        outs.append(torch.stack([tf(image=img)["image"] for _ in range(3)]))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(channels=2), "channels"),
        (dict(img_size=0), "img_size"),
        (dict(val_fraction=0.5, test_fraction=0.5), "fraction"),
        (dict(channels=1, mean=(0.5, 0.5, 0.5)), "mean"),
        (dict(batch_size=-4), "batch_size"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DigitsDataModule(**kwargs)


def test_build_datamodule():
    dm = build_datamodule(
        "digits", img_size=20, train_transform={"hflip_prob": 0.0, "randaugment_num_ops": 0}
    )
    assert (
        isinstance(dm, DigitsDataModule)
        and dm.img_size == 20
        and dm.train_transform.randaugment_num_ops == 0
    )
    with pytest.raises(ValueError, match="imagenet"):
        build_datamodule("imagenet")


# ---------------------------------------------------------------- YAML (as LightningCLI parses it)
def _parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    return parser


def test_datamodule_configurable_from_yaml():
    parser = _parser()
    cfg = parser.parse_string("""
data:
  class_path: vmoe.data.DigitsDataModule
  init_args:
    img_size: 24
    batch_size: 8
    train_transform:
      hflip_prob: 0.0
      scale: [0.5, 1.0]
      randaugment_num_ops: 1
      randaugment_magnitude: 7
      randaugment_ops: [Rotate, ShearX]
    eval_transform:
      crop_pct: 0.875
      interpolation: bicubic
""")
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, DigitsDataModule) and dm.img_size == 24 and dm.batch_size == 8
    assert dm.train_transform == TrainTransformConfig(
        scale=(0.5, 1.0),
        ratio=(0.85, 1.18),
        hflip_prob=0.0,
        randaugment_num_ops=1,
        randaugment_magnitude=7.0,
        randaugment_ops=["Rotate", "ShearX"],
        fill=0,
        interpolation="bilinear",
    )
    assert dm.eval_transform == EvalTransformConfig(crop_pct=0.875, interpolation="bicubic")
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 24, 24)


def test_partial_transform_config_keeps_the_datamodule_defaults():
    dm = DigitsDataModule(train_transform=TrainTransformConfig(randaugment_magnitude=2.0))
    t = dm.train_transform
    assert t.randaugment_magnitude == 2.0
    assert (
        t.hflip_prob == 0.0 and t.scale == (0.75, 1.0) and t.fill == 0
    )  # digits' defaults survive
    assert t.randaugment_ops == [
        "Identity",
        "Rotate",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
    ]
    generic = build_datamodule(
        "cifar10", img_size=224, train_transform={"hflip_prob": 0.0}
    ).train_transform
    assert generic == dataclasses.replace(DEFAULT_TRAIN, hflip_prob=0.0)


def test_yaml_unknown_key_is_an_error():
    with pytest.raises(Exception, match="hflip"):
        _parser().parse_string("""
data:
  class_path: vmoe.data.DigitsDataModule
  init_args:
    train_transform: {hflip: 0.0}
""")
