"""One data path: an ImageSource gives the same batches whatever holds the images, and nothing
outside ``harness/data/`` asks whether images are in memory."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from harness.data.datasets import load_dataset
from harness.data.source import image_source
from harness.data.stream import open_image_folder
from tests.data.test_stream import write_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same image folder in memory (a tensor) and streamed (a lazy collection)."""
    root = write_folder(tmp_path_factory.mktemp("imgs"), n_train=10, n_test=2)
    return load_dataset("image_folder", root=str(root), image_size=8).x_train, open_image_folder(str(root), image_size=8).x_train


def _passes(source, batches, n=2):
    return [[(xb.clone(), idx.clone()) for xb, idx in source.take(batches)] for _ in range(n)]


@pytest.mark.parametrize("persistent", [False, True])
def test_in_memory_and_streamed_sources_give_bitwise_the_same_batches(both, monkeypatch, persistent):
    monkeypatch.setenv("HARNESS_DATA_WORKERS", "1")
    x, lazy = both
    assert len(x) == len(lazy) == 40
    batches = [torch.randperm(40, generator=torch.Generator().manual_seed(s))[:16] for s in range(3)]
    mem = image_source(x, "cpu", channels_last=True)
    with image_source(lazy, "cpu", persistent=persistent, batches_per_pass=len(batches)) as streamed:
        assert len(mem) == len(streamed) == 40 and mem.device == streamed.device == torch.device("cpu")
        got_mem, got_lazy = _passes(mem, batches), _passes(streamed, batches)  # two passes: a persistent loader's workers are reused
    for one_mem, one_lazy in zip(got_mem, got_lazy):
        assert len(one_mem) == len(one_lazy) == 3
        for (xm, im), (xl, il), b in zip(one_mem, one_lazy, batches):
            assert torch.equal(im, b) and torch.equal(il, b)  # the indices come back, in order
            assert torch.equal(xm, x[b]) and torch.equal(xl, xm)  # bitwise the in-memory slice
    streamed.close()  # idempotent


def test_a_pass_stopped_early_stops_its_loader_and_the_next_pass_is_whole(both, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_WORKERS", "1")
    x, lazy = both
    batches = [torch.arange(i, i + 8) for i in range(0, 40, 8)]
    with image_source(lazy, "cpu", persistent=True, batches_per_pass=len(batches)) as src:
        it = src.take(batches)
        first, _ = next(it)
        it.close()  # what train_epoch does when a loss goes non-finite mid-epoch
        assert torch.equal(first, x[:8])
        again = [xb for xb, _ in src.take(batches)]
    assert torch.equal(torch.cat(again), x)


def test_a_tensor_stays_on_its_device_unless_one_is_named(both):
    x, _ = both
    src = image_source(x)
    assert src.device == x.device and src.images is x  # no copy: the in-memory path costs nothing


def test_no_module_outside_harness_data_asks_whether_images_are_in_memory():
    """``is_lazy`` (and LazyImages isinstance checks) belong to harness/data/: the loop, teacher
    outputs, evaluation and the estimate read one batch source."""
    offenders = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        if path.is_relative_to(ROOT / "harness" / "data"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
                next((a.name for a in node.names if a.name == "is_lazy"), None) if isinstance(node, ast.ImportFrom) else None
            if name == "is_lazy":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                    and "LazyImages" in ast.unparse(node):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} isinstance(..., LazyImages)")
    assert not offenders, "ask harness.data (image_source, in_chunks, on_device) instead: " + ", ".join(offenders)
