"""Input pipeline throughput: images/s of ONE CPU loader worker at 224 px (JPEG decode + the
training augmentation + collate), for vmoe's image-folder, Hugging Face and litdata-shard
sources and for timm's ``create_loader`` with the same augmentation strength
(RandomResizedCrop(0.08-1) + flip + RandAugment 2 ops at magnitude 9; timm: ``rand-m9-n2``).

Measured with ``num_workers=0`` (the loading runs in this process: one worker's throughput,
without the inter-process transfer). Images: synthetic 500x375 JPEGs (ImageNet's typical size;
textured noise, quality 90), written to a temp folder.

Also: torchvision.io.decode_jpeg vs PIL (the decode vmoe.data.load_image does) on the same
bytes: speed, and pixel difference (max and mean absolute, 0-255 scale).

Then the workers one H200 would need for a V-MoE-S/32 or B/16 training step, estimated from
FLOPs (not measured on a GPU): forward FLOPs per image counted with torch's FlopCounterMode (a CPU
forward of 8 images, eval capacity), x3 for forward + backward, at an assumed 40% of the H200's
989 dense bf16 TFLOP/s.

    PYTHONPATH=. python benchmarks/input_pipeline.py --images 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

H200_BF16_FLOPS = 989e12
MFU = 0.40


def make_jpegs(root: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    for i in range(n):
        arr = np.asarray(
            Image.fromarray(np.roll(base, i, axis=1)).resize((500, 375), Image.BILINEAR)
        )
        arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)


def rate(loader, warmup_batches: int = 1) -> float:
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    count, start = 0, time.perf_counter()
    for x, _ in it:
        count += len(x)
    return count / (time.perf_counter() - start)


def vmoe_loaders(folder: Path, tmp: Path, batch: int):
    from vmoe.data import HFDataModule, ImageFolderDataModule, ShardDataModule, write_shards

    (tmp / "split").mkdir()
    os.symlink(folder, tmp / "split" / "train")
    common = dict(img_size=224, batch_size=batch, num_workers=0)
    dm = ImageFolderDataModule(str(tmp / "split"), val_split=None, test_split=None, **common)
    dm.setup("fit")
    yield "vmoe image folder", dm.train_dataloader()
    import datasets

    datasets.load_dataset("imagefolder", data_dir=str(folder)).save_to_disk(str(tmp / "hf"))
    dm = HFDataModule(str(tmp / "hf"), val_fraction=0, **common)
    dm.setup("fit")
    yield "vmoe HF (save_to_disk)", dm.train_dataloader()
    write_shards(str(folder), str(tmp / "shards"), progress=False)
    dm = ShardDataModule(str(tmp / "shards"), **common)
    dm.setup("fit")
    yield "vmoe litdata shards", dm.train_dataloader()


def timm_loader(folder: Path, batch: int):
    from timm.data import create_dataset, create_loader

    ds = create_dataset("", root=str(folder), is_training=True)
    return create_loader(
        ds,
        input_size=(3, 224, 224),
        batch_size=batch,
        is_training=True,
        use_prefetcher=False,
        scale=(0.08, 1.0),
        hflip=0.5,
        auto_augment="rand-m9-n2",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_workers=0,
    )


def decoders(folder: Path, repeats: int = 3) -> dict:
    from torchvision.io import decode_jpeg

    from vmoe.data import load_image

    files = sorted(folder.glob("*/*.jpg"))[:64]
    blobs = [f.read_bytes() for f in files]
    start = time.perf_counter()
    for _ in range(repeats):
        pil = [load_image(f.name, b) for f, b in zip(files, blobs)]
    t_pil = (time.perf_counter() - start) / (repeats * len(blobs))
    start = time.perf_counter()
    for _ in range(repeats):
        tv = [
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)).permute(1, 2, 0).numpy()
            for b in blobs
        ]
    t_tv = (time.perf_counter() - start) / (repeats * len(blobs))
    diff = np.concatenate([np.abs(a.astype(int) - b.astype(int)).ravel() for a, b in zip(pil, tv)])
    return dict(
        pil_ms=1e3 * t_pil,
        torchvision_ms=1e3 * t_tv,
        max_abs=int(diff.max()),
        mean_abs=float(diff.mean()),
    )


def train_flops(name: str) -> float:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    import vmoe.models  # noqa: F401  (registers the models)

    batch = 8  # one routing group of images
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(batch, 3, 224, 224))
    return 3.0 * counter.get_total_flops() / batch  # forward + backward (2x forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)  # one worker = one core
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "jpegs"
        make_jpegs(folder, args.images)
        for name, loader in vmoe_loaders(folder, tmp, args.batch):
            rows.append((name, rate(loader)))
        rows.append(("timm create_loader (rand-m9-n2)", rate(timm_loader(folder, args.batch))))
        dec = decoders(folder)
    print(
        f"\n{args.images} JPEGs 500x375 -> 224 px, batch {args.batch}, "
        "one worker (num_workers=0, 1 thread)\n"
    )
    print("| source | img/s per worker |\n|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:.0f} |")
    print(
        f"\ndecode one 500x375 JPEG: PIL {dec['pil_ms']:.2f} ms, torchvision.io.decode_jpeg "
        f"{dec['torchvision_ms']:.2f} ms; "
        f"pixels differ by max {dec['max_abs']}, mean {dec['mean_abs']:.3f} (0-255)"
    )
    slowest = min(r for _, r in rows[:3])
    print(
        f"\nworkers for one H200 (FLOPs estimate, "
        f"{MFU:.0%} of {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16, "
        "not a measured GPU step):"
    )
    for name in ("vmoe_s32_e8_k2_last2", "vmoe_b16_e8_k2_last2"):
        flops = train_flops(name)
        ips = MFU * H200_BF16_FLOPS / flops
        print(
            f"  {name}: {flops / 1e9:.1f} GFLOPs/img per train step -> {ips:,.0f} img/s -> "
            f"{ips / slowest:.0f} workers at {slowest:.0f} img/s/worker"
        )


if __name__ == "__main__":
    main()
