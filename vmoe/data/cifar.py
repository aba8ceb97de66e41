"""CIFAR-10 / CIFAR-100, read from the official *binary* version (downloaded with torchvision's
download utility when online).

Why the binary version: torchvision's ``datasets.CIFAR10`` reads the Python version, which is a
pickle, and unpickling a file can run arbitrary code; the binary version is plain records
``<label byte(s)><3072 pixel bytes, R then G then B planes, 32x32 each>`` read with numpy.
Validation is a stratified ``val_fraction`` of the official train set (fixed by ``split_seed``);
test is the official test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torchvision.datasets.utils import download_and_extract_archive

from vmoe.data.base import VisionDataModule
from vmoe.data.datasets import ArrayDataset, stratified_split
from vmoe.data.transforms import TrainTransformConfig

_PIXELS = 32 * 32 * 3


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str  # what the archive extracts to, under data_dir
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # bytes before the pixels in each record
    label_index: int  # which of them is the label
    num_classes: int
    records_per_train_file: int
    records_per_test_file: int
    names_file: str
    python_folder: str  # torchvision's pickled version, which is not read


CIFAR10_SPEC = CifarSpec(
    name="CIFAR-10",
    folder="cifar-10-batches-bin",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    label_bytes=1,
    label_index=0,
    num_classes=10,
    records_per_train_file=10000,
    records_per_test_file=10000,
    names_file="batches.meta.txt",
    python_folder="cifar-10-batches-py",
)
CIFAR100_SPEC = CifarSpec(
    name="CIFAR-100",
    folder="cifar-100-binary",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",
    train_files=("train.bin",),
    test_files=("test.bin",),
    label_bytes=2,
    label_index=1,  # <coarse label><fine label>: the 100 fine classes
    num_classes=100,
    records_per_train_file=50000,
    records_per_test_file=10000,
    names_file="fine_label_names.txt",
    python_folder="cifar-100-python",
)


def read_cifar_binary(
    path: Path, label_bytes: int, label_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """One binary file -> images uint8 [N, 32, 32, 3], labels int64 [N]."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"'{path}' is not a CIFAR binary file: {raw.size} bytes is not a multiple of {record}"
        )
    raw = raw.reshape(-1, record)
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), raw[:, label_index].astype(np.int64)


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 (10 classes, 50,000 train / 10,000 test 32x32 RGB images).

    Args (besides those of ``VisionDataModule``, passed on as ``**kwargs``):
        data_dir: folder holding (or receiving) ``cifar-10-batches-bin``.
        download: fetch and extract the archive in ``prepare_data`` if absent (needs network).
        val_fraction: stratified fraction of the train set held out for validation (V-MoE
            fine-tuning holds out 2%).
        split_seed: fixes that split.
    """

    spec = CIFAR10_SPEC

    def __init__(
        self,
        data_dir: str = "data",
        img_size: int = 32,
        download: bool = True,
        val_fraction: float = 0.02,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(img_size=img_size, **kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if self.channels != 3:
            raise ValueError(
                f"{self.spec.name} is RGB: mean/std need 3 entries, got mean={self.mean}"
            )
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_classes = self.spec.num_classes
        self.classes: Optional[list[str]] = None

    def default_train_transform(self) -> TrainTransformConfig:
        # A mild crop at CIFAR's native size; upscaled inputs (e.g. 224) can use the ImageNet
        # default.
        return (
            TrainTransformConfig(scale=(0.35, 1.0))
            if self.img_size <= 64
            else TrainTransformConfig()
        )

    @property
    def folder(self) -> Path:
        return self.data_dir / self.spec.folder

    def _missing_files(self) -> list[str]:
        files = self.spec.train_files + self.spec.test_files
        return [f for f in files if not (self.folder / f).is_file()]

    def _not_found_message(self, reason: str) -> str:
        s = self.spec
        archive = s.url.rsplit("/", 1)[1]
        msg = (
            f"{s.name} not found: {reason}. Expected the folder '{s.folder}' (the binary version) "
            f"with {', '.join(s.train_files + s.test_files)} under data_dir='{self.data_dir}' "
            f"-> {self.folder}. Download {s.url} (md5 {s.md5}) and extract it there: "
            f"tar xzf {archive} -C {self.data_dir}"
            + (
                " (prepare_data(), which the Trainer calls before setup, downloads it)"
                if self.download
                else " (or set download=True on a machine that is online)"
            )
        )
        if (self.data_dir / s.python_folder).is_dir():
            msg += (
                f". Note: '{self.data_dir / s.python_folder}' (the pickled Python version) is not "
                "read, because unpickling a file can run arbitrary code"
            )
        return msg

    def prepare_data(self) -> None:
        """Download once per node (Lightning calls this on local rank 0 only)."""
        if not self._missing_files() or not self.download:
            return
        try:
            download_and_extract_archive(
                self.spec.url, download_root=str(self.data_dir), md5=self.spec.md5
            )
        except Exception as err:  # offline: URLError/socket errors; a bad mirror: md5 mismatch
            raise FileNotFoundError(
                self._not_found_message(
                    f"the download failed ({type(err).__name__}: {err}); offline?"
                )
            ) from err

    def _read(self, files: Sequence[str], records: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in files:
            x, y = read_cifar_binary(
                self.folder / name, self.spec.label_bytes, self.spec.label_index
            )
            if len(y) != records:
                raise ValueError(
                    f"'{self.folder / name}' holds {len(y)} images, expected {records}: "
                    f"incomplete? Re-extract {self.spec.url}"
                )
            if y.max() >= self.num_classes:
                raise ValueError(
                    f"'{self.folder / name}' has label {y.max()} >= {self.num_classes}: not "
                    f"{self.spec.name}?"
                )
            images.append(x)
            labels.append(y)
        return np.concatenate(images), np.concatenate(labels)

    def _setup_datasets(self, stage: Optional[str]) -> None:
        if self.train_set is not None:
            return
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(self._not_found_message(f"missing {', '.join(missing)}"))
        names = self.folder / self.spec.names_file
        if names.is_file():
            self.classes = [n for n in names.read_text().splitlines() if n.strip()][
                : self.num_classes
            ]
        train_x, train_y = self._read(self.spec.train_files, self.spec.records_per_train_file)
        test_x, test_y = self._read(self.spec.test_files, self.spec.records_per_test_file)
        train, val, _ = stratified_split(train_y, self.val_fraction, 0.0, self.split_seed)
        eval_tf = self.build_eval_transform()
        self.train_set = ArrayDataset(train_x[train], train_y[train], self.build_train_transform())
        self.val_set = ArrayDataset(train_x[val], train_y[val], eval_tf)
        self.test_set = ArrayDataset(test_x, test_y, eval_tf)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (100 fine classes, 50,000 train / 10,000 test); folder ``cifar-100-binary``.
    Same arguments as ``CIFAR10DataModule``."""

    spec = CIFAR100_SPEC
