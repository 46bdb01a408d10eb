"""The training loop: labels only for methods that declare them, weighted sums, NaN guard, determinism."""

from __future__ import annotations

import pytest
import torch

from harness.config import DatasetConfig, SplitConfig, TrainConfig
from harness.data.splits import build_split
from harness.methods.base import Batch, Method, SplitInfo, TeacherSet
from harness.models import build_model
from harness.train import NonFiniteLossError, evaluate, fit

DATA = build_split(SplitConfig(name="s", tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]), DatasetConfig(name="digits"))
CFG = TrainConfig(epochs=2, batch_size=256)


def _teachers():
    torch.manual_seed(0)
    return TeacherSet([build_model("mlp", DATA.in_shape, 5, hidden=16) for _ in range(2)])


class Spy(Method):
    """Records what each batch carries; loss = weighted sum of two simple terms."""

    terms = {"a": None, "b": None}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[Batch] = []

    def loss_terms(self, batch):
        self.seen.append(batch)
        z = self.student(batch.x)
        return {"a": z.pow(2).mean(), "b": z.abs().mean()}


class LabelledSpy(Spy):
    uses_labels = True


class Exploding(Spy):
    def loss_terms(self, batch):
        return {"a": self.student(batch.x).sum() * float("nan")}


def _make(cls):
    torch.manual_seed(3)
    return cls(build_model("mlp", DATA.in_shape, 10, hidden=16), _teachers(), cls.ParamsModel(),
               SplitInfo(tuple(DATA.sizes), tuple(DATA.offsets)))


def test_label_free_methods_never_receive_labels():
    m = _make(Spy)
    fit(m, DATA, CFG, seed=0)
    assert m.seen and all(b.y is None for b in m.seen)
    assert all(len(b.teacher_logits) == 2 and b.teacher_feats[1].shape[1] == 16 for b in m.seen)
    # teacher outputs in the batch are those of the frozen teachers on exactly these images
    b = m.seen[-1]
    tl, _ = m.teachers.outputs(b.x)
    assert torch.allclose(tl[0], b.teacher_logits[0])


def test_labelled_methods_receive_the_true_union_labels():
    m = _make(LabelledSpy)
    fit(m, DATA, CFG, seed=0)
    b = m.seen[0]
    assert torch.equal(b.y, DATA.parts["train"].y[b.index])


def test_epoch_metrics_are_weighted_sum_and_logged_per_term():
    m = _make(Spy)
    logged = []
    res = fit(m, DATA, CFG, seed=0, on_epoch=lambda e, mtr: logged.append((e, mtr)))
    assert [e for e, _ in logged] == [1, 2]
    first = logged[0][1]
    assert {"loss/a", "loss/b", "loss/total", "val/union_acc", "val/task_acc/0", "epoch_seconds",
            "images_per_second"} <= set(first)
    assert first["loss/total"] == pytest.approx(first["loss/a"] + first["loss/b"], rel=1e-6)
    n_batches = len(DATA.parts["train"]) // CFG.batch_size
    assert len(m.seen) == 2 * n_batches and all(len(b.x) == CFG.batch_size for b in m.seen)
    assert {"test/union_acc", "test/union_acc_best", "test/task_acc/1", "test/task_acc_best/1", "best_epoch"} <= set(res.final)


def test_non_finite_loss_raises():
    with pytest.raises(NonFiniteLossError, match=r"loss/a is nan"):
        fit(_make(Exploding), DATA, CFG, seed=0)


def test_same_seed_same_result_and_seed_changes_order():
    a, b, c = _make(Spy), _make(Spy), _make(Spy)
    ra, rb, rc = fit(a, DATA, CFG, seed=0), fit(b, DATA, CFG, seed=0), fit(c, DATA, CFG, seed=1)
    assert ra.history[-1]["loss/total"] == rb.history[-1]["loss/total"] and ra.final == rb.final
    assert not torch.equal(a.seen[0].index, c.seen[0].index)


def test_evaluate_union_and_per_task_accuracy_by_hand():
    from harness.data.splits import PartData

    y = torch.tensor([0, 1, 3, 4])
    t = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([
        [5.0, 0, 0, 0, 0],   # union 0 correct, task-0 slice correct
        [0, 1, 0, 9, 0],     # union wrong (3), inside S_0 = [0,2): argmax 1 correct
        [0, 0, 0, 2, 1],     # correct
        [9, 0, 0, 1, 0],     # union wrong (0), inside S_1 = [2,5): argmax 3 wrong
    ])
    part = PartData(logits, y, t)
    out = evaluate(lambda x: x, part, [2, 3], [0, 2], "cpu")
    assert out == {"union_acc": 0.5, "task_acc/0": 1.0, "task_acc/1": 0.5}


def test_augment_is_a_padded_crop_with_optional_flip():
    from harness.train import augment

    x = torch.arange(3 * 2 * 8 * 8, dtype=torch.float).reshape(3, 2, 8, 8) + 1
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(3):  # every output is one of the 3x3 crops of the padded image, maybe flipped
        crops = [xp[i, :, a : a + 8, b : b + 8] for a in range(3) for b in range(3)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    outs = torch.stack([augment(x, torch.Generator().manual_seed(s)) for s in range(20)])
    assert len({o.sum().item() for o in outs[:, 0]}) > 1  # the crops vary with the seed
