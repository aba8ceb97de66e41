"""Input pipeline throughput, measured fairly: images/s per CPU loader worker at 224 px (JPEG
read from disk + decode + the training augmentation + collate) for vmoe's image-folder, Hugging
Face and litdata-shard sources, the two faster vmoe paths, and timm's ``create_loader``.

Same augmentation work on both sides: RandomResizedCrop(0.08-1) + flip + RandAugment 2 ops at
magnitude 9. vmoe applies both ops to every image; timm's ``rand-m9-n2`` applies each with
probability 0.5 (half the work on average), so timm is also measured as ``rand-m9-n2-p1.0``.

The faster paths (same 500x375 JPEGs -> 224 px):
- ``make-shards --max-size N``: images stored resized on write (longer side N, as FFCV's
  ``max_resolution``), so that training decodes and crops fewer pixels;
- ``ImageFolderDataModule(decode_size=N)``: JPEGs decoded at reduced DCT scale (PIL's
  ``draft``) before the crop. N=224 never decodes below the training size, which cannot reduce
  a 375-px-high image (1/2 would be 188 px); N=160 decodes these at 1/2 (250x188).

Each row: the median over ``--repeats`` passes over ``--images`` synthetic 500x375 JPEGs
(ImageNet's typical size; textured noise, quality 90) written to a temp folder, with 1 and 2
loader worker processes (1 torch/OpenCV thread each), the clock started at the first batch
(worker start-up excluded). On a shared machine only the ratios within one run mean much.

Also: torchvision.io.decode_jpeg vs PIL on the same bytes, and the workers one H200 would need
for a V-MoE-S/32 or B/16 training step, estimated from FLOPs (not measured on a GPU): forward
FLOPs per image counted with torch's FlopCounterMode (a CPU forward of 8 images, eval capacity),
x3 for forward + backward, at an assumed 40% of the H200's 989 dense bf16 TFLOP/s.

    PYTHONPATH=. python benchmarks/input_pipeline.py --images 256 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
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


def _worker_cpu() -> dict:
    """CPU seconds (user + system) used so far by each child process (the loader workers)."""
    import psutil

    used = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        used[child.pid] = times.user + times.system
    return used


class Meter:
    """Images/s of passes over one loader: by the wall clock (from the first batch to the last)
    and per CPU second of the loader worker processes (every image of the pass over the CPU
    time the workers used in it, start-up included), the figure that other load on the
    machine disturbs least."""

    def __init__(self, loader, normalize=None):
        self.loader, self.normalize = loader, normalize

    def one_pass(self) -> tuple[float, float]:
        before = _worker_cpu()  # other loaders' workers, idle now, add ~0 below
        it = iter(self.loader)
        x, _ = next(it)
        main = 0.0  # main-process CPU seconds of ``normalize`` (uint8 batches), counted too
        if self.normalize is not None:
            tick = time.thread_time()
            self.normalize(x)
            main += time.thread_time() - tick
        count, start = 0, time.perf_counter()
        total, cpu = len(x), before
        for x, _ in it:
            count += len(x)
            cpu = _worker_cpu()  # at each batch: the workers may exit after the last one
            if self.normalize is not None:
                tick = time.thread_time()
                self.normalize(x)
                main += time.thread_time() - tick
        wall = time.perf_counter() - start
        used = sum(t - before.get(pid, 0.0) for pid, t in cpu.items()) + main
        return count / wall, (total + count) / used


def paired(meter: Meter, reference: Meter, repeats: int) -> dict:
    """``repeats`` passes of ``meter`` each next to one of ``reference`` (order alternating),
    so that both see the same load: medians of the wall and CPU rates and of the CPU ratio."""
    rows = []
    for r in range(repeats):
        if r % 2:
            ref, got = reference.one_pass(), meter.one_pass()
        else:
            got, ref = meter.one_pass(), reference.one_pass()
        rows.append((got[0], got[1], got[1] / ref[1]))
    wall, cpu, ratio = (float(np.median(v)) for v in zip(*rows))
    return {"wall": wall, "cpu": cpu, "ratio": ratio}


def vmoe_loaders(folder: Path, tmp: Path, batch: int, workers: int, built: dict):
    """(name, loader) of each vmoe source; the shard folders and the HF copy are written once
    (``built`` keeps them between worker counts)."""
    from vmoe.data import HFDataModule, ImageFolderDataModule, ShardDataModule, write_shards

    if not built:
        (tmp / "split").mkdir()
        os.symlink(folder, tmp / "split" / "train")
        import datasets

        datasets.load_dataset("imagefolder", data_dir=str(folder)).save_to_disk(str(tmp / "hf"))
        for size in (None, 320, 256):
            out = tmp / f"shards-{size}"
            write_shards(str(folder), str(out), progress=False, max_size=size)
            built[size] = out
    common = dict(img_size=224, batch_size=batch, num_workers=workers)

    def folder_dm(**kw):
        dm = ImageFolderDataModule(str(tmp / "split"), val_split=None, test_split=None, **kw)
        dm.setup("fit")
        return dm.train_dataloader()

    yield "vmoe image folder", folder_dm(**common)
    dm = HFDataModule(str(tmp / "hf"), val_fraction=0, **common)
    dm.setup("fit")
    yield "vmoe HF (save_to_disk)", dm.train_dataloader()
    dm = ShardDataModule(str(built[None]), **common)
    dm.setup("fit")
    yield "vmoe litdata shards", dm.train_dataloader()
    for size in (320, 256):
        dm = ShardDataModule(str(built[size]), **common)
        dm.setup("fit")
        yield f"vmoe shards, make-shards --max-size {size}", dm.train_dataloader()
    for size in (224, 160):
        yield f"vmoe image folder, decode_size={size}", folder_dm(decode_size=size, **common)
    for size in (None, 256):
        dm = ShardDataModule(str(built[size]), normalize_on_device=True, **common)
        dm.setup("fit")
        yield uint8_row(size), dm.train_dataloader()


def uint8_row(size) -> str:
    shards = "shards" if size is None else f"shards --max-size {size}"
    return f"vmoe {shards}, normalize_on_device (uint8 batches; main-process normalize counted)"


def main_normalize(x: torch.Tensor) -> torch.Tensor:
    """What ``normalize_on_device`` leaves to the training process, run here on the CPU so that
    its cost is counted (on a GPU it runs on the device)."""
    from vmoe.data import normalize_uint8

    return normalize_uint8(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def timm_loader(folder: Path, batch: int, workers: int, auto_augment: str):
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
        auto_augment=auto_augment,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_workers=workers,
        persistent_workers=True,
    )


TIMM = {
    "timm create_loader (rand-m9-n2)": "rand-m9-n2",
    "timm create_loader (rand-m9-n2-p1.0)": "rand-m9-n2-p1.0",
}


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


def stages(folder: Path, repeats: int = 3) -> dict:
    """CPU ms per image of each step of the ``--max-size 256`` training path, in this process
    (1 thread): JPEG decode, RandomResizedCrop + flip, RandAugment, Normalize + to tensor, or
    uint8 to tensor (``normalize_on_device``), stacking 32 into a batch, pickling a batch (a
    stand-in for the copy between processes), and ``normalize_uint8`` of a batch."""
    import io
    import pickle

    from vmoe.data import TrainTransformConfig, build_train_transform, load_image, normalize_uint8

    blobs = []
    for f in sorted(folder.glob("*/*.jpg"))[:64]:  # as make-shards --max-size 256 stores them
        out = io.BytesIO()
        Image.open(f).resize((256, 192), Image.BILINEAR).save(out, "JPEG", quality=90)
        blobs.append(out.getvalue())
    steps = list(build_train_transform(224, TrainTransformConfig(), (0.5,) * 3, (0.5,) * 3, 0))
    import albumentations as A

    def ms(fn, items, per=1):
        start = time.process_time()
        for _ in range(repeats):
            out = [fn(x) for x in items]
        return 1e3 * (time.process_time() - start) / (repeats * len(items) * per), out

    got = {}
    got["decode"], images = ms(lambda b: load_image("x", b), blobs)
    crop = A.Compose(steps[:2], seed=0)
    got["crop+flip"], crops = ms(lambda im: crop(image=im)["image"], images)
    aug = A.Compose(steps[2:3], seed=0)
    got["randaugment"], augs = ms(lambda im: aug(image=im)["image"], crops)
    norm = A.Compose(steps[3:], seed=0)
    got["normalize+to tensor"], floats = ms(lambda im: norm(image=im)["image"], augs)
    got["uint8 to tensor"], u8 = ms(lambda im: torch.from_numpy(im.transpose(2, 0, 1)), augs)
    for name, tensors in (("float32", floats), ("uint8", u8)):
        got[f"stack {name}"], batches = ms(torch.stack, [tensors[:32], tensors[32:]], 32)
        got[f"pickle {name}"], _ = ms(pickle.dumps, batches, 32)
    got["normalize_uint8"], _ = ms(
        lambda x: normalize_uint8(x, (0.5,) * 3, (0.5,) * 3), batches, 32
    )
    return got


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-flops", action="store_true", help="skip the H200 worker estimate")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)  # one worker = one core
    rates: dict = {}  # name -> {workers: paired(...)}
    built: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "jpegs"
        make_jpegs(folder, args.images)
        for workers in args.workers:
            reference = Meter(timm_loader(folder, args.batch, workers, "rand-m9-n2"))
            # timm's own row is a second loader of the reference's kind: its ratio is the noise
            sources = [(n, timm_loader(folder, args.batch, workers, a)) for n, a in TIMM.items()]
            for name, loader in itertools.chain(
                sources, vmoe_loaders(folder, tmp, args.batch, workers, built)
            ):
                meter = Meter(loader, main_normalize if "normalize_on_device" in name else None)
                rates.setdefault(name, {})[workers] = paired(meter, reference, args.repeats)
                del loader
            del reference, sources
        dec = decoders(folder)
        steps = stages(folder)
    print(
        f"\n{args.images} JPEGs 500x375 -> 224 px, batch {args.batch}, 1 thread per worker, "
        f"medians of {args.repeats} passes each paired with one of timm rand-m9-n2: img/s per "
        "worker per CPU second of the workers (x timm rand-m9-n2, the paired ratio), then by "
        "the wall clock / workers\n"
    )
    head = " | ".join(
        f"{w} worker{'s' if w > 1 else ''}: CPU (x timm) | wall" for w in args.workers
    )
    print(f"| source | {head} |\n|---|" + "---|---|" * len(args.workers))
    for name, by_workers in rates.items():
        cells = " | ".join(
            f"{by_workers[w]['cpu']:.0f} ({by_workers[w]['ratio']:.2f}x) | "
            f"{by_workers[w]['wall'] / w:.0f}"
            for w in args.workers
        )
        print(f"| {name} | {cells} |")
    print(
        f"\ndecode one 500x375 JPEG: PIL {dec['pil_ms']:.2f} ms, torchvision.io.decode_jpeg "
        f"{dec['torchvision_ms']:.2f} ms; "
        f"pixels differ by max {dec['max_abs']}, mean {dec['mean_abs']:.3f} (0-255)"
    )
    print(
        "\nCPU ms per image, --max-size 256 path in one process: "
        + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
    )
    if args.no_flops:
        return
    slowest = min(rates[n][args.workers[0]]["cpu"] for n in list(rates)[2:5])
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
