"""MedMNIST splits as in-memory tensors, found offline or downloaded by medmnist.

Where the files come from, first match wins: the run config's ``data-root``, ``$MEDMNIST_ROOT``,
medmnist's own default root (``~/.medmnist``). A file that is absent there is downloaded by
medmnist when the network allows; a file that is absent or unreadable otherwise raises
:class:`DataFileError` naming the file and how to provide it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT

log = logging.getLogger(__name__)
ZENODO = "https://zenodo.org/records/10519652"


class DataFileError(FileNotFoundError):
    """A MedMNIST file that is missing or unreadable; the message says how to provide it."""


@dataclass(frozen=True)
class TaskInfo:
    """What the model and the metrics need to know about a dataset."""

    flag: str
    task: str  # medmnist's task string, e.g. "binary-class", "multi-label, binary-class"
    num_classes: int
    in_chans: int

    @property
    def multi_label(self) -> bool:
        return self.task.startswith("multi-label")


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N, L), MedMNIST's own layout."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])


def task_info(flag: str) -> TaskInfo:
    info = INFO[flag]
    return TaskInfo(flag, info["task"], len(info["label"]), info["n_channels"])


def resolve_root(data_root: str = "") -> Path:
    """The directory to read from: run config, then $MEDMNIST_ROOT, then medmnist's default."""
    return Path(data_root or os.environ.get("MEDMNIST_ROOT") or DEFAULT_ROOT).expanduser()


def file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def load_split(flag: str, split: str, size: int = 28, data_root: str = "") -> Split:
    """One split ('train', 'val' or 'test') of a MedMNIST file."""
    arrays = _load_npz(str(resolve_root(data_root)), flag, size)
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    images = torch.from_numpy(images).unsqueeze(1) if images.ndim == 3 else torch.from_numpy(images).permute(0, 3, 1, 2)
    return Split(images.contiguous(), torch.from_numpy(labels.astype(np.int64)))


@cache
def _load_npz(root: str, flag: str, size: int) -> dict[str, np.ndarray]:
    """All six arrays of a file, read once per process and shared by every client it hosts."""
    if flag not in INFO:
        raise DataFileError(f"unknown MedMNIST flag {flag!r}; valid flags: {', '.join(INFO)}")
    path = Path(root) / file_name(flag, size)
    if not path.exists():
        _download(flag, size, Path(root))
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        missing = {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")} - set(arrays)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise DataFileError(
            f"MedMNIST file {path} is unreadable ({type(err).__name__}: {err}). "
            f"Replace it with the official {file_name(flag, size)} from {ZENODO} "
            f"(MD5 {_expected_md5(flag, size)})."
        ) from err
    if _md5(path) != _expected_md5(flag, size):
        log.warning("%s differs from the official MedMNIST release (MD5 %s); its splits may not be "
                    "the official ones, so do not report its numbers as official results",
                    path, _expected_md5(flag, size))
    return arrays


def _download(flag: str, size: int, root: Path) -> None:
    """Let medmnist fetch the file; without network, fail with the ways to provide it by hand."""
    import medmnist

    name = file_name(flag, size)
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if the download fails
    try:
        root.mkdir(parents=True, exist_ok=True)
        getattr(medmnist, INFO[flag]["python_class"])(split="test", size=size, root=str(root), download=True)
    except Exception as err:  # medmnist wraps every network failure in a bare RuntimeError
        for path in created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise DataFileError(
            f"MedMNIST file {root / name} not found and could not be downloaded ({type(err).__name__}). "
            f"Provide it: put {name} (from {ZENODO}, MD5 {_expected_md5(flag, size)}) in a directory and "
            f"point data-root=DIR or MEDMNIST_ROOT=DIR at it, or allow network access for the download."
        ) from None
    if not (root / name).exists():
        raise DataFileError(f"medmnist reported a download but {root / name} is absent")


def _expected_md5(flag: str, size: int) -> str:
    return INFO[flag]["MD5" if size == 28 else f"MD5_{size}"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
