"""Streams over a run: a Hugging Face stream reshuffles and reseeds its augmentation every epoch
(a 2-epoch fit), and the learning-rate schedule knows how long a run on a stream is (its row
count when known, else a one-line error asking for ``--trainer.max_steps``)."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

datasets = pytest.importorskip("datasets")

from vmoe.data import HFDataModule  # noqa: E402
from vmoe.data.transforms import TrainTransformConfig  # noqa: E402
from vmoe.train import VmoeClassifier  # noqa: E402
from vmoe.train.optim import lr_factor  # noqa: E402
from vmoe.train.resume import ResumableTraining  # noqa: E402

N, BATCH = 22, 4
NO_AUG = TrainTransformConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment_num_ops=0)
NO_AUG = NO_AUG.merged_over(TrainTransformConfig(hflip_prob=0.0))


def id_image(i: int, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = i % 256, i // 256, (37 * i) % 256
    return img


def ids_of(x: torch.Tensor) -> list:
    """The ids of a batch [B, 3, H, W] normalized with mean = std = 0.5."""
    v = ((x[:, :2, 0, 0] * 0.5 + 0.5) * 255).round().long()
    return (v[:, 0] + 256 * v[:, 1]).tolist()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    for i in range(N):
        (root / "tree" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_image(i)).save(root / "tree" / f"c{i % 2}" / f"{i:03d}.png")
    datasets.load_dataset("imagefolder", data_dir=str(root / "tree")).save_to_disk(str(root / "hf"))
    (root / "pq").mkdir()
    datasets.load_from_disk(str(root / "hf"))["train"].to_parquet(str(root / "pq" / "t.parquet"))
    return root


def _trainer(**kw):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


class Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.current_epoch, ids_of(batch[0]), lr))


def _module(**kw):
    return VmoeClassifier(
        model_name="vmoe_tiny_e4_k2", num_classes=2, img_size=16, lr=1e-3, warmup_steps=1, **kw
    )


def test_a_stream_reshuffles_every_epoch_in_a_fit_and_the_schedule_spans_both(saved):
    torch.manual_seed(0)
    dm = HFDataModule(
        str(saved / "hf"),
        streaming=True,
        shuffle_buffer=8,
        val_fraction=0,
        img_size=16,
        batch_size=BATCH,
        seed=3,
        train_transform=NO_AUG,
    )
    record = Record()
    trainer = _trainer(max_epochs=2, callbacks=[record, ResumableTraining(seed=0)])
    trainer.fit(_module(schedule="linear", end_lr=1e-5), datamodule=dm)
    epochs = [e for e, _, _ in record.rows]
    steps_per_epoch = -(-N // BATCH)
    assert epochs == [0] * steps_per_epoch + [1] * steps_per_epoch
    order = {e: [i for ee, ids, _ in record.rows if ee == e for i in ids] for e in (0, 1)}
    assert sorted(order[0]) == sorted(order[1]) == list(range(N))  # every row once an epoch
    assert order[0] != order[1]  # reshuffled
    # ... as the deterministic function of (seed, epoch): the dataset on its own gives the same
    for epoch in (0, 1):
        dm.train_set.set_epoch(epoch)
        assert [ids_of(x[None])[0] for x, _ in dm.train_set] == order[epoch]
    # the schedule spans the 2 epochs (on main its length was max_steps = -1: 1e-5 after warmup)
    total = 2 * steps_per_epoch
    expected = [
        1e-3
        * lr_factor(
            k, total_steps=total, warmup_steps=1, schedule="linear", peak_lr=1e-3, end_lr=1e-5
        )
        for k in range(total)
    ]
    assert np.allclose([lr for _, _, lr in record.rows], expected, rtol=1e-6)


def test_a_stream_reseeds_its_augmentation_every_epoch(saved):
    dm = HFDataModule(
        str(saved / "hf"), streaming=True, shuffle_buffer=0, val_fraction=0, img_size=16, seed=1
    )
    dm.setup("fit")  # the default augmentation (random crops, flips, RandAugment)

    def epoch(e):
        dm.train_set.set_epoch(e)
        return torch.stack([x for x, _ in dm.train_set])

    first, second = epoch(0), epoch(1)
    # without ResumableTraining, Lightning's set_epoch on the loader's sampler reaches the stream
    dm.train_dataloader().sampler.set_epoch(5)
    assert dm.train_set.epoch == 5
    assert not torch.equal(first, second)  # same rows in the same order, other augmentations
    assert torch.equal(epoch(1), second) and torch.equal(epoch(0), first)  # (seed, epoch) decide


def test_the_schedule_of_a_stream_of_unknown_length_asks_for_max_steps(saved):
    dm = HFDataModule(str(saved / "pq"), streaming=True, val_fraction=0, img_size=16, num_classes=2)
    trainer = _trainer(max_epochs=2)
    with pytest.raises(ValueError) as err:
        trainer.fit(_module(schedule="cosine"), datamodule=dm)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "--trainer.max_steps" in message
    # a constant schedule needs no length; neither does a run with max_steps
    _trainer(max_epochs=1, limit_train_batches=2).fit(_module(schedule="constant"), datamodule=dm)
    dm = HFDataModule(str(saved / "pq"), streaming=True, val_fraction=0, img_size=16, num_classes=2)
    _trainer(max_steps=2).fit(_module(schedule="cosine"), datamodule=dm)


def test_the_schedule_length_of_shards_comes_from_their_count(saved, tmp_path):
    pytest.importorskip("litdata")
    from vmoe.data import ShardDataModule, write_shards

    write_shards(str(saved / "tree"), str(tmp_path / "s"), chunk_bytes="400B", progress=False)
    dm = ShardDataModule(str(tmp_path / "s"), img_size=16, batch_size=BATCH)
    record = Record()
    trainer = _trainer(max_epochs=2, callbacks=[record])
    trainer.fit(_module(schedule="linear", end_lr=1e-5), datamodule=dm)
    total = 2 * -(-N // BATCH)
    assert len(record.rows) == total
    last = 1e-3 * lr_factor(
        total - 1, total_steps=total, warmup_steps=1, schedule="linear", peak_lr=1e-3, end_lr=1e-5
    )
    assert np.isclose(record.rows[-1][2], last, rtol=1e-6)
