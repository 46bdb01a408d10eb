"""The training loop: labels only for methods that declare them, weighted sums, NaN guard, determinism."""

from __future__ import annotations

import pytest
import torch

from harness.config import DatasetConfig, SplitConfig, TrainConfig
from harness.data.splits import build_split
from harness.methods.base import Batch, Method, SplitInfo, TeacherSet
from harness.models import build_model
from harness.train import NonFiniteLossError, effective_precision, evaluate, fit, opaque_ids, tf32_flags

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
    position = torch.argsort(opaque_ids(len(DATA.parts["train"])))  # id -> position in the part
    assert torch.equal(b.y, DATA.parts["train"].y[position[b.index]])


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
    ra, rb = fit(a, DATA, CFG, seed=0), fit(b, DATA, CFG, seed=0)
    fit(c, DATA, CFG, seed=1)
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


def test_augment_ops_crop_only_never_flips_and_flip_only_never_shifts():
    from harness.train import augment

    x = torch.rand(64, 1, 8, 8) + 0.1  # no zero pixels: a shifted crop shows its zero padding
    crop = augment(x, torch.Generator().manual_seed(0), ("crop",))
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(64):
        crops = [xp[i, :, a : a + 8, b : b + 8] for a in range(3) for b in range(3)]
        assert any(torch.equal(crop[i], c) for c in crops)
    assert (crop == 0).any()  # some images were shifted
    flip = augment(x, torch.Generator().manual_seed(0), ("flip",))
    flipped = [torch.equal(flip[i], x[i].flip(-1)) for i in range(64)]
    assert all(f or torch.equal(flip[i], x[i]) for i, f in enumerate(flipped)) and 10 < sum(flipped) < 54
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), ()), x)
    # both: the draws of the recipe before augmentation became configurable (crop, then flip)
    both = augment(x, torch.Generator().manual_seed(0), ("crop", "flip"))
    assert torch.equal(both, augment(x, torch.Generator().manual_seed(0)))


def test_batch_index_is_an_opaque_id_that_carries_no_task():
    from scipy.stats import spearmanr

    m = _make(Spy)
    fit(m, DATA, TrainConfig(epochs=2, batch_size=64), seed=0)
    n = len(DATA.parts["train"])
    position = torch.argsort(opaque_ids(n))
    ids = torch.cat([b.index for b in m.seen])
    tasks = DATA.parts["train"].t[position[ids]]
    rho = spearmanr(ids.numpy(), tasks.numpy()).statistic
    assert abs(rho) < 0.1
    # raw positions (what the index used to be) would give the task away: the part is task-major
    assert spearmanr(position[ids].numpy(), tasks.numpy()).statistic > 0.8
    # an id names one image: the same id carries the same image in every epoch
    per_epoch = len(m.seen) // 2
    first = {int(i): b.x[j] for b in m.seen[:per_epoch] for j, i in enumerate(b.index)}
    later = [(int(i), b.x[j]) for b in m.seen[per_epoch:] for j, i in enumerate(b.index)]
    assert all(torch.equal(first[i], x) for i, x in later if i in first)
    assert sum(i in first for i, _ in later) > 0.5 * len(later)


class Peaks(Method):
    """Validation accuracy set by the epoch: ``SCHEDULE[e]`` of the images are predicted right.

    The only state is a buffer counting the batches seen (part of the state dict, so restoring
    the best-validation state restores the epoch). Image i of a part (in part order) is right
    iff ``i / len(part) < q``; predictions look images up by their pixels."""

    terms = {"a": None}
    SCHEDULE = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.9, 5: 0.7}

    def __init__(self, *a, batches_per_epoch: int, **kw):
        super().__init__(*a, **kw)
        self.per_epoch = batches_per_epoch
        self.register_buffer("seen_batches", torch.zeros((), dtype=torch.long))
        self.lookup = {}
        for part in ("val", "test"):
            p = DATA.parts[part]
            for i in range(len(p)):
                self.lookup[p.x[i].numpy().tobytes()] = (int(p.y[i]), i / len(p))

    def loss_terms(self, batch):
        self.seen_batches += 1
        return {"a": self.student(batch.x).sum() * 0.0}

    def predict(self, x):
        q = self.SCHEDULE[int(self.seen_batches) // self.per_epoch]
        out = torch.zeros(len(x), DATA.num_classes)
        for j in range(len(x)):
            y, u = self.lookup[x[j].numpy().tobytes()]
            out[j, y if u < q else (y + 1) % DATA.num_classes] = 1.0
        return out


def _expected_acc(part: str, q: float) -> float:
    n = len(DATA.parts[part])
    return sum(i / n < q for i in range(n)) / n


def test_best_epoch_is_the_first_peak_of_validation_and_its_model_is_the_one_tested():
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=5, batch_size=256)
    per_epoch = len(DATA.parts["train"]) // 256
    m = Peaks(build_model("mlp", DATA.in_shape, 10, hidden=8), TeacherSet([]), Peaks.ParamsModel(),
              SplitInfo(tuple(DATA.sizes), tuple(DATA.offsets)), batches_per_epoch=per_epoch)
    res = fit(m, DATA, cfg, seed=0)
    vals = [h["val/union_acc"] for h in res.history]
    assert vals == pytest.approx([_expected_acc("val", Peaks.SCHEDULE[e]) for e in range(1, 6)], abs=1e-7)
    # epochs 2 and 4 tie at the peak: the first one wins; the last epoch (5) is not the best
    assert res.best_epoch == 2
    assert res.final["best_epoch"] == 2.0
    assert res.final["val/union_acc_best"] == pytest.approx(_expected_acc("val", 0.9), abs=1e-7)
    assert res.final["test/union_acc"] == pytest.approx(_expected_acc("test", 0.7), abs=1e-7)  # last: epoch 5
    assert res.final["test/union_acc_best"] == pytest.approx(_expected_acc("test", 0.9), abs=1e-7)
    assert res.final["test/union_acc_best"] != res.final["test/union_acc"]
    # the method is left with the LAST epoch's state (diagnostics read the last model)
    assert int(m.seen_batches) == 5 * per_epoch
    assert int(res.best_state["seen_batches"]) == 2 * per_epoch


def test_teachers_stay_frozen_through_a_trial_with_augmentation():
    torch.manual_seed(0)
    teachers = TeacherSet([build_model("cnn", DATA.in_shape, 5, width=8) for _ in range(2)])
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in teachers.modules())
    before = {k: v.clone() for k, v in teachers.state_dict().items()}

    class Frozen(Spy):
        def loss_terms(self, batch):
            assert not self.teachers.training and not any(t.training for t in self.teachers.modules())
            # the batch's teacher outputs are the eval-mode teachers on exactly the augmented images
            tl, _ = self.teachers.outputs(batch.x)
            assert torch.equal(tl[0], batch.teacher_logits[0])
            return super().loss_terms(batch)

    torch.manual_seed(3)
    m = Frozen(build_model("mlp", DATA.in_shape, 10, hidden=16), teachers, Frozen.ParamsModel(),
               SplitInfo(tuple(DATA.sizes), tuple(DATA.offsets)))
    res = fit(m, DATA, TrainConfig(epochs=2, batch_size=64, augment=True, lr=0.05), seed=0)
    assert m.seen and res.history[-1]["loss/total"] > 0
    after = teachers.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a teacher parameter or BN buffer moved"
    assert not any(p.requires_grad for p in teachers.parameters())


# --------------------------------------------------------------------------- determinism


class FlagSpy(Spy):
    """Reads back, in every batch, the flags the process really has while the method trains."""

    def loss_terms(self, batch):
        self.flags = _flags()
        return super().loss_terms(batch)


def _flags() -> tuple[bool, bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)


def test_deterministic_training_sets_the_flags_while_it_trains_and_restores_them_after():
    assert _flags() == (False, False, False)
    on, off = _make(FlagSpy), _make(FlagSpy)
    res_on = fit(on, DATA, TrainConfig(epochs=1, batch_size=256, deterministic=True), seed=0)
    assert on.flags == (True, True, False)
    assert _flags() == (False, False, False)  # a trial in this process leaves the process as it found it
    assert res_on.deterministic is True
    res_off = fit(off, DATA, TrainConfig(epochs=1, batch_size=256, deterministic=False), seed=0)
    assert off.flags == (False, False, False) and res_off.deterministic is False  # no cudnn autotuning off CUDA
    # and deterministic kernels change no number on the CPU: the same losses and accuracies
    assert res_on.final == res_off.final and res_on.history[0]["loss/total"] == res_off.history[0]["loss/total"]


class TF32Spy(Spy):
    """Reads back, in every batch, whether TF32 is allowed while the method trains."""

    def loss_terms(self, batch):
        self.tf32 = tf32_flags()
        return super().loss_terms(batch)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp32_training_runs_with_tf32_off_whatever_the_process_had(deterministic: bool):
    """``fp32`` in a trial key means IEEE float32: the loop turns TF32 off for matmuls and
    convolutions (read back inside the training step), deterministic or not."""
    saved = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True  # as a user may leave them
    try:
        spy = _make(TF32Spy)
        fit(spy, DATA, TrainConfig(epochs=1, batch_size=256, deterministic=deterministic), seed=0)
        assert spy.tf32 == {"matmul": False, "cudnn": False}
        assert effective_precision(TrainConfig(amp=False), "cuda:0") == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved["matmul"], saved["cudnn"]


def test_determinism_on_cuda_sets_the_cublas_workspace_before_cuda_starts(monkeypatch: pytest.MonkeyPatch):
    """The CUDA branch, on a CPU build (torch.cuda.is_initialized() is False here): the cuBLAS
    variable is set, kept when already deterministic, and a late one (CUDA started) is reported."""
    import os

    from harness.train import CUBLAS_WORKSPACE_VAR, determinism, deterministic_env

    monkeypatch.setenv(CUBLAS_WORKSPACE_VAR, "")  # recorded, so that the process gets its own value back ...
    monkeypatch.delenv(CUBLAS_WORKSPACE_VAR)  # ... also after determinism() set it below
    assert deterministic_env(False) == {} and deterministic_env(True) == {CUBLAS_WORKSPACE_VAR: ":4096:8"}
    with determinism(False, "cuda") as det:
        assert det is False and torch.backends.cudnn.benchmark  # autotuning only when not deterministic
        assert CUBLAS_WORKSPACE_VAR not in os.environ
    with determinism(True, "cuda") as det:
        assert det is True and os.environ[CUBLAS_WORKSPACE_VAR] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    monkeypatch.setenv(CUBLAS_WORKSPACE_VAR, ":16:8")  # the other deterministic setting is kept
    assert deterministic_env(True) == {CUBLAS_WORKSPACE_VAR: ":16:8"}
    monkeypatch.setenv(CUBLAS_WORKSPACE_VAR, ":0:0")  # not deterministic: replaced
    assert deterministic_env(True) == {CUBLAS_WORKSPACE_VAR: ":4096:8"}
    monkeypatch.delenv(CUBLAS_WORKSPACE_VAR)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA started before the variable
    with pytest.warns(UserWarning, match="set after CUDA started"):
        with determinism(True, "cuda") as det:
            assert det is False and os.environ[CUBLAS_WORKSPACE_VAR] == ":4096:8"


# --------------------------------------------------------------------------- diagnostics in chunks


def test_diagnostics_route_in_bounded_chunks_with_the_whole_set_decisions():
    from harness.methods.base import get_method
    from harness.train import EVAL_BATCH, teacher_outputs
    from harness.trial import diagnostics

    kd = get_method("kd")

    class Counting(kd):
        def route(self, logits, feats):
            self.rows.append(len(logits[0]))
            return super().route(logits, feats)

    torch.manual_seed(3)
    m = Counting(build_model("mlp", DATA.in_shape, 10, hidden=16), _teachers(), kd.ParamsModel(),
                 SplitInfo(tuple(DATA.sizes), tuple(DATA.offsets)))
    m.rows = []
    n = len(DATA.parts["train"])
    assert n > EVAL_BATCH  # so that the training part takes two chunks
    whole = {p: m.route(*teacher_outputs(m.teachers, DATA.parts[p].x))[0] for p in ("train", "test")}
    m.rows.clear()
    out = diagnostics(m, m.teachers, DATA, "cpu")
    assert max(m.rows) <= EVAL_BATCH and sum(m.rows) == n + len(DATA.parts["test"])
    assert out["diag/pseudo_label_acc"] == (whole["train"] == DATA.parts["train"].y).float().mean().item()
    assert out["diag/ensemble_union_acc"] == (whole["test"] == DATA.parts["test"].y).float().mean().item()
    # oracle routing, image by image: the teacher of the image's own task, its argmax in its slice
    for part, key in (("train", "diag/oracle_pseudo_label_acc"), ("test", "diag/oracle_ensemble_acc")):
        logits, _ = teacher_outputs(m.teachers, DATA.parts[part].x)
        y, t = DATA.parts[part].y.tolist(), DATA.parts[part].t.tolist()
        oracle = [DATA.offsets[t[i]] + int(logits[t[i]][i].argmax()) for i in range(len(y))]
        assert out[key] == pytest.approx(sum(o == c for o, c in zip(oracle, y)) / len(y), abs=1e-7)
        # a claim can only be right where the image's own teacher is right: claiming <= oracle, per image
        claim_right = (whole[part] == DATA.parts[part].y).tolist()
        assert all(o == c for o, c, r in zip(oracle, y, claim_right) if r)
        assert 0 < sum(claim_right) < sum(o == c for o, c in zip(oracle, y))  # routing costs something here


def test_each_epoch_draws_a_new_batch_order():
    m = _make(Spy)
    fit(m, DATA, TrainConfig(epochs=2, batch_size=256), seed=0)
    per_epoch = len(m.seen) // 2
    first = torch.cat([b.index for b in m.seen[:per_epoch]])
    second = torch.cat([b.index for b in m.seen[per_epoch:]])
    assert not torch.equal(first, second)


def test_augmentation_draws_new_crops_every_batch_from_the_trial_generator():
    """Crop-only augmentation: which images of a batch were left unshifted is a fresh draw per
    batch (a generator re-created per batch would repeat the same pattern) and repeats with the seed."""
    position = torch.argsort(opaque_ids(len(DATA.parts["train"])))

    def patterns(seed: int) -> list[torch.Tensor]:
        m = _make(Spy)
        fit(m, DATA, TrainConfig(epochs=1, batch_size=64, augment=["crop"]), seed=seed)
        x = DATA.parts["train"].x
        return [torch.tensor([torch.equal(b.x[j], x[position[i]]) for j, i in enumerate(b.index)]) for b in m.seen]

    a, b = patterns(0), patterns(0)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # the same seed: the same crops
    assert any(p.any() for p in a) and not all(torch.equal(a[0], p) for p in a[1:])
