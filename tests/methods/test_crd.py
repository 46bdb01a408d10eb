"""``crd`` (baselines/crd.py): the NCE, InfoNCE and memory-update formulas by hand, the memory as
state (lazy growth, state dict, devices, eval mode), labels, gradients, and training through the
real loop with both ``negatives`` settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from baselines.crd import NCE_EPS, info_nce, momentum_update, nce_loss
from harness import cli, losses
from harness.config import DatasetConfig, SplitConfig, TrainConfig
from harness.data.splits import build_split
from harness.errors import HarnessError
from harness.methods.base import Batch, SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.train import fit

SHAPE = (1, 8, 8)
SIZES, OFFSETS = (3, 2), (0, 3)


def _teachers() -> TeacherSet:
    torch.manual_seed(0)  # heterogeneous feature widths: 24 and 40
    return TeacherSet([build_model("cnn", SHAPE, 3, width=4, feature_dim=24), build_model("mlp", SHAPE, 2, hidden=40)])


def _method(**params):
    torch.manual_seed(1)
    cls = get_method("crd")
    student = build_model("cnn", SHAPE, sum(SIZES), width=4)
    params = {"T": 4.0, **params}  # RepDistiller's kd_T, so the kd term's values below are those at T = 4
    return cls(student, _teachers(), cls.parse_params(params, "methods.crd"), SplitInfo(SIZES, OFFSETS))


def _batch(n: int = 16, ids: Tensor | None = None, labels: bool = False, seed: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    tl, tf = _teachers().outputs(x)
    y = torch.randint(0, sum(SIZES), (n,), generator=g) if labels else None
    return Batch(x=x, index=torch.arange(n) if ids is None else ids, teacher_logits=tl, teacher_feats=tf, y=y)


def _total(m, terms: dict[str, Tensor]) -> Tensor:
    w = m.weights()
    return sum(w[t] * v for t, v in terms.items())


def _unit(*v: float) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


# --------------------------------------------------------------------------- the formulas by hand


def test_info_nce_is_cross_entropy_of_rows_and_columns_by_hand():
    a = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    b = [[0.8, 0.6], [0.0, 1.0], _unit(1.0, -1.0)]
    t = 0.5
    s = [[_dot(ai, bj) / t for bj in b] for ai in a]
    rows = sum(-(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(3)))) for i in range(3)) / 3
    cols = sum(-(s[i][i] - math.log(sum(math.exp(s[j][i]) for j in range(3)))) for i in range(3)) / 3
    got = info_nce(torch.tensor(a), torch.tensor(b), t)
    assert got.item() == pytest.approx(rows + cols, rel=1e-6)
    assert rows != pytest.approx(cols, rel=1e-3)  # the two directions differ: both are in the sum
    # two pairs: exactly log(1 + e^{(s12 - s11)}) + ... written out
    a2, b2 = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]
    s11, s12, s21, s22 = 1 / t, 0.6 / t, 0.0, 0.8 / t
    by_hand = (math.log(1 + math.exp(s12 - s11)) + math.log(1 + math.exp(s21 - s22))) / 2 \
        + (math.log(1 + math.exp(s21 - s11)) + math.log(1 + math.exp(s12 - s22))) / 2
    assert info_nce(torch.tensor(a2), torch.tensor(b2), t).item() == pytest.approx(by_hand, rel=1e-6)


BANK = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]
ANCHORS = [[0.6, 0.8], _unit(1.0, 1.0)]
POS = [3, 0]


def _official_by_hand(neg: list[list[int]], t: float, z: float | None) -> tuple[float, float]:
    """RepDistiller's ContrastMemory + ContrastLoss on gathered rows, in plain Python:
    out = exp(<M[idx], v> / t) / Z over idx = [pos, neg...], Z = mean(out) * N when unset,
    loss = -(sum_i log D1 + sum_ik log D0) / B."""
    n, k = len(BANK), len(neg[0])
    out = [[math.exp(_dot(BANK[j], v) / t) for j in [p, *ns]] for v, p, ns in zip(ANCHORS, POS, neg)]
    if z is None:
        z = sum(map(sum, out)) / (len(out) * (k + 1)) * n
    c = k / n
    total = 0.0
    for row in out:
        p_pos = row[0] / z
        total += math.log(p_pos / (p_pos + c + NCE_EPS))
        total += sum(math.log(c / (e / z + c + NCE_EPS)) for e in row[1:])
    return -total / len(out), z


def test_nce_loss_is_the_official_formulation_on_injected_negatives_by_hand():
    anchor, bank, pos = torch.tensor(ANCHORS), torch.tensor(BANK), torch.tensor(POS)
    neg = [[1, 2], [2, 2]]  # a repeated draw counts twice
    for z in (3.0, 0.7):
        loss, z_used = nce_loss(anchor, bank, pos, torch.tensor(neg), 0.5, z)
        assert loss.item() == pytest.approx(_official_by_hand(neg, 0.5, z)[0], rel=1e-6)
        assert z_used.item() == pytest.approx(z)
    # Z unset (None or -1, the memory's marker): estimated on this batch, N * mean of the B (K+1) scores
    want, z_hat = _official_by_hand(neg, 0.5, None)
    for unset in (None, -1.0, torch.tensor(-1.0)):
        loss, z_used = nce_loss(anchor, bank, pos, torch.tensor(neg), 0.5, unset)
        assert z_used.item() == pytest.approx(z_hat, rel=1e-6) and loss.item() == pytest.approx(want, rel=1e-6)
    # neg=None: every other row once (K = N - 1), the same as listing them
    others = [[j for j in range(4) if j != p] for p in POS]
    loss, _ = nce_loss(anchor, bank, pos, None, 0.5, 3.0)
    assert loss.item() == pytest.approx(_official_by_hand(others, 0.5, 3.0)[0], rel=1e-6)
    _, z_hat = nce_loss(anchor, bank, pos, None, 0.5)
    assert z_hat.item() == pytest.approx(_official_by_hand(others, 0.5, None)[1], rel=1e-6)


def test_nce_loss_equals_gathered_rows_on_random_data_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 6, generator=g), dim=1)
    bank = F.normalize(torch.randn(11, 6, generator=g), dim=1)
    pos = torch.tensor([0, 3, 7, 10, 3])
    neg = torch.randint(0, 11, (5, 17), generator=g)  # K > N: many repeats
    idx = torch.cat([pos[:, None], neg], 1)
    out = torch.exp(torch.bmm(bank[idx], a[:, :, None]).squeeze(2) / 0.1)  # the official gather
    z = out.mean() * 11
    p, c = out / z, 17 / 11
    log_d1, log_d0 = torch.log(p[:, 0] / (p[:, 0] + c + NCE_EPS)), torch.log(c / (p[:, 1:] + c + NCE_EPS))
    ref = -(log_d1.sum() + log_d0.sum()) / 5
    loss, z_hat = nce_loss(a, bank, pos, neg, 0.1)
    assert torch.allclose(z_hat, z, rtol=1e-5) and torch.allclose(loss, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="neg must have shape"):
        nce_loss(a, bank, pos, neg[:4], 0.1)
    with pytest.raises(ValueError, match="widths differ"):
        nce_loss(a, bank[:, :4], pos, neg, 0.1)


def test_momentum_update_is_normalised_half_old_half_new_exactly():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    v = torch.tensor([[0.0, 1.0], [0.6, -0.8]])
    before = bank.clone()
    new = momentum_update(bank, torch.tensor([2, 0]), v, 0.5)
    assert new[2].tolist() == pytest.approx(_unit(0.5 * 0.6 + 0.5 * 0.0, 0.5 * 0.8 + 0.5 * 1.0), abs=1e-7)
    assert new[0].tolist() == pytest.approx(_unit(0.5 * 1.0 + 0.5 * 0.6, 0.5 * 0.0 - 0.5 * 0.8), abs=1e-7)
    assert torch.equal(new[1], bank[1]) and torch.equal(bank, before)  # other rows kept, input untouched
    new = momentum_update(bank, torch.tensor([1]), torch.tensor([[0.6, 0.8]]), 0.25)  # m = 0.25
    assert new[1].tolist() == pytest.approx(_unit(0.75 * 0.6, 0.25 + 0.75 * 0.8), abs=1e-7)


# --------------------------------------------------------------------------- the method


def test_crd_defaults_and_embedding_heads():
    m = _method()
    p = m.params
    assert (p.w_kd, p.w_crd, p.T, p.feat_dim, p.nce_k, p.nce_t, p.nce_m, p.negatives) == \
        (1.0, 0.8, 4.0, 128, 16384, 0.07, 0.5, "bank")  # T = 4 set by _method
    assert get_method("crd").parse_params({}, "methods.crd").T == 1.0  # the default: kd's
    assert m.weights() == {"kd": 1.0, "crd": 0.8} and get_method("crd").ablations == {"kd": "w_kd", "crd": "w_crd"}
    assert [e.linear.in_features for e in m.embed_t] == [24, 40]
    assert [e.linear.in_features for e in m.embed_s] == [m.student.feature_dim] * 2
    assert all(e.linear.out_features == 128 for e in [*m.embed_s, *m.embed_t])
    assert len(m.memory) == 2 and _method(negatives="batch").memory is None
    for bad, msg in (({"negatives": "queue"}, "methods.crd.negatives: "), ({"nce_m": 1.0}, "methods.crd.nce_m: ")):
        with pytest.raises(HarnessError) as e:
            get_method("crd").parse_params(bad, "methods.crd")
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)


@pytest.mark.parametrize("routing", ["confidence", "confidence/none/routed"])
def test_kd_term_is_kds_term_at_the_same_temperature(routing):
    b = _batch()
    crd = _method(routing=routing)
    kd = get_method("kd")(crd.student, crd.teachers, get_method("kd").parse_params({"T": 4.0, "routing": routing}, "k"),
                          SplitInfo(SIZES, OFFSETS))
    assert torch.allclose(crd.loss_terms(b)["kd"], kd.loss_terms(b)["kd"], atol=1e-6)
    z_s = crd.student(b.x)
    if routing == "confidence":
        q = torch.softmax(torch.cat(b.teacher_logits, 1) / 4, 1)
        assert crd.loss_terms(b)["kd"].item() == pytest.approx(
            16 * (q * (q.log() - F.log_softmax(z_s / 4, 1))).sum(1).mean().item(), rel=1e-5)


def _both_directions(m, b: Batch, negs: list) -> Tensor:
    """sum_k NCE(v_s^k vs M_k) + NCE(v_k vs M_s^k) with m's heads and (unchanged) memories."""
    _, f_s = m.student.forward_both(b.x)
    total = torch.zeros(())
    for k, (mem, neg) in enumerate(zip(m.memory, negs)):
        v_s, v_k = m.embed_s[k](f_s), m.embed_t[k](b.teacher_feats[k])
        total = total + nce_loss(v_s, mem.teacher, b.index, neg, 0.07)[0] + nce_loss(v_k, mem.student, b.index, neg, 0.07)[0]
    return total


def test_bank_term_is_the_sum_over_teachers_of_both_nce_directions():
    b = _batch()
    ref = _method(small_pool="every_row")
    for mem in ref.memory:
        mem.grow(16)
    m = copy.deepcopy(ref)  # the same 16 rows: the method has nothing more to draw
    got = m.loss_terms(b)
    # every_row and N = 16 <= nce_k + 1: every other row is a negative; Z estimated on this (first) batch
    want = _both_directions(ref, b, [None, None])
    assert set(got) == {"kd", "crd"} and torch.allclose(got["crd"], want, rtol=1e-5) and got["crd"] > 0
    assert m.run_tags() == {"harness.crd_negatives": "every other row (K = pool - 1 = 15)"}


def test_a_small_pool_draws_nce_k_negatives_with_replacement_by_default_as_the_reference():
    # N = 16 <= nce_k + 1 = 16,385: the reference (RepDistiller's AliasMethod) still draws K ids per
    # anchor with replacement, so K / N = 1024 in the noise term and repeats count; not every row once
    b = _batch()
    m = _method()
    assert m.params.small_pool == "draw"
    ref = copy.deepcopy(m)
    torch.manual_seed(5)
    got = m.loss_terms(b)["crd"]
    torch.manual_seed(5)
    negs = []
    for mem in ref.memory:
        mem.grow(16)
        negs.append(torch.randint(16, (16, 16384)))
    assert torch.allclose(got, _both_directions(ref, b, negs), rtol=1e-5)
    assert not torch.allclose(got, _both_directions(copy.deepcopy(ref), b, [None, None]), rtol=1e-3)
    assert m.run_tags() == {"harness.crd_negatives": "drawn with replacement (K = 16384, pool 16)"}
    assert _method(negatives="batch").run_tags() == {"harness.crd_negatives": "batch (in-batch InfoNCE)"}


def test_sampled_negatives_are_uniform_draws_of_the_global_rng_shared_by_both_directions():
    ids = torch.tensor([3, 17, 9, 0, 12, 29])  # N = 30 > nce_k + 1: 5 draws per anchor
    b = _batch(6, ids=ids)
    m = _method(nce_k=5)
    ref = copy.deepcopy(m)
    torch.manual_seed(11)
    got = m.loss_terms(b)["crd"]
    torch.manual_seed(11)
    negs = []
    for mem in ref.memory:  # the method's order of draws: teacher 0's new rows, its negatives, teacher 1's ...
        mem.grow(30)
        negs.append(torch.randint(30, (6, 5)))
    want = _both_directions(ref, b, negs)
    assert torch.allclose(got, want, rtol=1e-5)
    torch.manual_seed(12)  # other draws, another value: the negatives are sampled, not all rows
    assert not torch.allclose(copy.deepcopy(ref).loss_terms(b)["crd"], got, rtol=1e-4)


def test_memory_grows_lazily_updates_the_batch_rows_and_fixes_z():
    m = _method()
    b1 = _batch(8, ids=torch.tensor([4, 0, 7, 19, 2, 11, 5, 13]))
    t1 = m.loss_terms(b1)
    mem = m.memory[1]
    assert len(mem) == 20 and all(len(x) == 20 for x in m.memory)
    z1 = mem.z.clone()
    assert (z1 > 0).all()
    ids = b1.index
    for bank in (mem.student, mem.teacher):
        assert torch.allclose(bank[ids].norm(dim=1), torch.ones(8))
    snap = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("memory.")}
    b2 = _batch(4, ids=torch.tensor([25, 1, 3, 6]), seed=3)
    untouched = torch.tensor([i for i in range(20) if i not in ids.tolist() + b2.index.tolist()])
    m.loss_terms(b2)
    assert len(mem) == 26
    assert torch.equal(mem.student[untouched], snap["memory.1.student"][untouched])  # old rows kept
    assert torch.equal(mem.student[ids], snap["memory.1.student"][ids])  # not in batch 2: not moved
    assert torch.equal(mem.z, z1)  # Z is estimated once, on the first batch
    # the update is the momentum rule with the embeddings of the batch (checked through a copy)
    m3 = copy.deepcopy(m)
    _, f_s = m3.student.forward_both(b2.x)
    v_s = m3.embed_s[1](f_s).detach()
    before = m3.memory[1].student.clone()
    m3.loss_terms(b2)
    assert torch.allclose(m3.memory[1].student, momentum_update(before, b2.index, v_s, 0.5), atol=1e-6)
    assert t1["crd"].requires_grad and not mem.student.requires_grad


def test_eval_mode_reads_but_does_not_move_the_memory():
    m = _method()
    m.loss_terms(_batch(8))
    snap = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("memory.")}
    m.eval()
    m.loss_terms(_batch(8, seed=5))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snap.items())


def test_memory_is_state_it_loads_into_a_fresh_method_and_moves_with_to():
    m = _method()
    m.loss_terms(_batch(8, ids=torch.tensor([4, 0, 7, 19, 2, 11, 5, 13])))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert {"memory.0.student", "memory.0.teacher", "memory.0.z", "memory.1.student"} <= set(state)
    fresh = _method()
    assert len(fresh.memory[0]) == 0
    fresh.load_state_dict(state)  # 0 rows -> 20 rows
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    m.loss_terms(_batch(4, ids=torch.tensor([30, 1, 3, 6])))
    assert len(m.memory[0]) == 31
    m.load_state_dict(state)  # 31 rows -> 20 (the loop restores the best epoch's state)
    assert len(m.memory[0]) == 20 and torch.equal(m.memory[0].student, state["memory.0.student"])
    bad = {**state, "memory.0.student": torch.zeros(20, 5)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(bad)  # a bank of another width is not silently taken
    m.to("meta")
    assert {b.device.type for b in m.buffers()} == {"meta"}


def test_it_never_sees_labels_a_batch_with_labels_gives_the_same():
    assert get_method("crd").uses_labels is False
    for neg in ("bank", "batch"):
        a, b = _method(negatives=neg), _method(negatives=neg)
        ta, tb = a.loss_terms(_batch(labels=False)), b.loss_terms(_batch(labels=True))
        assert _batch(labels=True).y is not None
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))


@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_gradients_reach_the_student_and_both_heads_never_the_teachers(negatives):
    b = _batch()
    for params, student_learns_from in (({}, "both"), ({"w_kd": 0.0}, "crd")):
        m = _method(negatives=negatives, **params)
        terms = m.loss_terms(b)
        assert set(terms) == ({"kd", "crd"} if student_learns_from == "both" else {"crd"})
        _total(m, terms).backward()
        for part in (m.student.head if student_learns_from == "both" else None, *m.embed_s, *m.embed_t):
            if part is None:
                continue
            w = part.weight if hasattr(part, "weight") else part.linear.weight
            assert w.grad is not None and w.grad.abs().sum() > 0
        feat_params = [p for n, p in m.student.named_parameters() if not n.startswith("head")]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in feat_params)  # crd reaches the features
        assert all(p.grad is None for p in m.teachers.parameters())
        assert all(not x.requires_grad for x in m.buffers())


def test_batch_negatives_term_is_info_nce_per_teacher_summed():
    b = _batch()
    m = _method(negatives="batch", nce_t=0.2)
    _, f_s = m.student.forward_both(b.x)
    want = sum(info_nce(es(f_s), et(f), 0.2) for es, et, f in zip(m.embed_s, m.embed_t, b.teacher_feats))
    assert torch.allclose(m.loss_terms(b)["crd"], want, atol=1e-6)
    assert not torch.allclose(_method(negatives="batch").loss_terms(b)["crd"], want, atol=1e-3)  # nce_t acts


@pytest.mark.parametrize(("negatives", "small_pool", "factor"), [
    ("bank", "every_row", 0.8), ("batch", "draw", 0.8),
    # K = 16,384 draws from 32 rows: the noise term K/N = 512 keeps a floor the loss cannot pass
    ("bank", "draw", 0.9)])
def test_loss_decreases_on_a_fixed_batch(negatives, small_pool, factor):
    b0 = _batch(32)  # the untrained teachers' features of noise images are nearly parallel (cosine
    g = torch.Generator().manual_seed(3)  # 0.97-0.99): nothing to tell apart; diverse features instead
    b = Batch(b0.x, b0.index, b0.teacher_logits, [torch.randn(32, f.shape[1], generator=g) for f in b0.teacher_feats])
    m = _method(negatives=negatives, small_pool=small_pool)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
    seen = []
    for _ in range(12):
        terms = m.loss_terms(b)
        seen.append({k: v.item() for k, v in terms.items()})
        opt.zero_grad()
        _total(m, terms).backward()
        opt.step()
    assert all(math.isfinite(v) for s in seen for v in s.values())
    assert seen[-1]["crd"] < factor * seen[0]["crd"] and seen[-1]["kd"] < seen[0]["kd"], seen


DIGITS = build_split(SplitConfig(name="s", tasks=[[0, 1], [2, 3]]), DatasetConfig(name="digits"))


@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_trains_through_the_real_loop_on_digits(negatives):
    torch.manual_seed(0)
    teachers = TeacherSet([build_model("mlp", DIGITS.in_shape, 2, hidden=16) for _ in range(2)])
    cls = get_method("crd")
    student = build_model("mlp", DIGITS.in_shape, 4, hidden=16)
    m = cls(student, teachers, cls.parse_params({"negatives": negatives}, "m"),
            SplitInfo(tuple(DIGITS.sizes), tuple(DIGITS.offsets)))
    res = fit(m, DIGITS, TrainConfig(epochs=2, batch_size=128), seed=0)
    n = len(DIGITS.parts["train"])
    assert len(res.history) == 2
    for h in res.history:
        assert {"loss/kd", "loss/crd", "loss/total"} <= set(h)
        assert all(math.isfinite(h[k]) for k in ("loss/kd", "loss/crd", "loss/total"))
        assert h["loss/total"] == pytest.approx(h["loss/kd"] + 0.8 * h["loss/crd"], rel=1e-5)
    assert 0.0 <= res.final["test/union_acc"] <= 1.0
    if negatives == "bank":
        for mem in m.memory:  # every id is a row; the rows of the images seen are unit vectors
            assert len(mem) == n and (mem.z > 0).all()
            unit = (mem.student.norm(dim=1) - 1).abs() < 1e-5
            assert unit.sum() >= (n // 128) * 128
    else:
        assert m.memory is None and not list(m.buffers(recurse=False))


def test_cli_lists_crd_with_its_terms_and_parameters(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(out) if line.startswith("crd: "))
    block = "\n".join(out[i : i + 4])
    assert "loss terms: kd (weight w_kd), crd (weight w_crd)" in block
    assert "-kd sets w_kd=0, -crd sets w_crd=0" in block
    for p in ("w_kd=1.0", "w_crd=0.8", "T=1.0", "negatives='bank'", "feat_dim=128", "nce_k=16384", "nce_t=0.07", "nce_m=0.5", "routing="):
        assert p in block, p
    assert "sees labels" not in out[i]


def test_soft_target_kl_is_the_shared_function():  # the kd term is harness.losses', not a copy
    b = _batch()
    m = _method(w_crd=0.0)
    assert torch.equal(m.loss_terms(b)["kd"], losses.soft_target_kl(torch.cat(b.teacher_logits, 1), m.student(b.x), 4.0))
