"""The data sets the harness knows, by name, and the archives it can download: data only.

The study schema (:mod:`harness.config`) checks the names a study file gives against this
catalogue, so it needs neither the loaders (numpy, torch) nor the downloader. The loaders are
registered under these names in :data:`harness.data.datasets.DATASETS` (a test holds the two
equal); the downloader (:mod:`harness.data.download`, which re-exports :data:`ARCHIVES`) fetches
the archives listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.registry import Registry

#: every data set :func:`harness.data.datasets.load_dataset` can load (its registry's names)
DATASET_NAMES = ("cifar10", "cifar100", "digits", "image_folder", "mnist5k", "npz")


@dataclass(frozen=True)
class CifarArchive:
    """One downloadable data set: its archive, published MD5 and the folder the archive holds."""

    dataset: str  # name in the dataset registry
    filename: str  # archive file name on the server
    md5: str  # published MD5 of the archive
    folder: str  # top-level folder inside the archive (what the reader looks for under root)
    files: tuple[str, ...]  # files inside ``folder`` that the reader needs


ARCHIVES: Registry[CifarArchive] = Registry("downloadable data set")
ARCHIVES.register("cifar10")(CifarArchive(
    "cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
    ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
))  # fmt: skip
ARCHIVES.register("cifar100")(CifarArchive(
    "cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e58002c38acd2", "cifar-100-python",
    ("meta", "train", "test"),
))  # fmt: skip
