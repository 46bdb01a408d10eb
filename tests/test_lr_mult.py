"""``train.lr_mult``: per-role learning rates set by the recipe, never by a method.

Every trainable method declares which parameter plays which role (``Method.param_roles``:
``body``, ``head``, ``method``); :func:`harness.train.method_optimizer` turns roles and the
recipe into one group per role: ``lr_body = lr``, ``lr_head = lr * lr_mult.head``,
``lr_method = lr * lr_mult.method``. Real methods on tiny nets, real optimisers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from harness.cli import main
from harness.config import TrainConfig, parse_study
from harness.errors import HarnessError
from harness.grid import expand
from harness.methods.base import PARAM_ROLES, Batch, SplitInfo, TeacherSet, discover, get_method
from harness.models import MODELS, build_model
from harness.search import SearchPlan, apply_params
from harness.train import make_optimizer, method_optimizer
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
SIZES, OFFSETS = (3, 2), (0, 3)
LR = 0.01
MULT = {"head": 3.0, "method": 7.0}
#: small parameters that keep a method's own modules tiny (defaults otherwise)
SMALL_PARAMS = {"cfl": {"c": 8}, "crd": {"feat_dim": 8}, "cka": {"proj_hidden": 16, "proj_dim": 8}}
#: the modules each built-in method owns (the ``method`` role); docs/methods.md lists the same
OWNED = {"cka": ("g_s", "g_t"), "kd": (), "rkd": (), "cfl": ("a_s", "a_t", "extractor", "dec"),
         "crd": ("embed_s", "embed_t"), "scratch": ()}
#: the built-in trainable methods (not the test plug-ins other test modules register)
TRAINABLE = [n for n in discover().names()
             if discover().get(n).trains and discover().get(n).__module__.startswith(("harness.", "baselines."))]


def _teachers() -> TeacherSet:
    torch.manual_seed(0)  # two conv teachers: cfl runs its maps form (no fallback warning)
    return TeacherSet([build_model("cnn", SHAPE, 3, width=4), build_model("cnn", SHAPE, 2, width=6)])


def _method(name: str):
    cls = get_method(name)
    teachers = _teachers()
    torch.manual_seed(1)
    student = build_model("cnn", SHAPE, sum(SIZES), width=3)
    params = {k: v for k, v in SMALL_PARAMS.get(name, {}).items() if k in cls.ParamsModel.model_fields}
    return cls(student, teachers, cls.parse_params(params, f"methods.{name}"), SplitInfo(SIZES, OFFSETS))


def _lrs(opt: torch.optim.Optimizer) -> dict[int, list[float]]:
    """id(parameter) -> the lr of every group that holds it."""
    out: dict[int, list[float]] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            out.setdefault(id(p), []).append(g["lr"])
    return out


def test_every_built_in_trainable_method_has_its_owned_modules_listed():
    builtin = [n for n in TRAINABLE if discover().get(n).__module__.startswith(("harness.", "baselines."))]
    assert sorted(builtin) == sorted(OWNED)


@pytest.mark.parametrize("name", TRAINABLE)
def test_each_parameter_trains_at_lr_times_its_roles_multiplier(name):
    m = _method(name)
    opt = method_optimizer(m, TrainConfig(lr=LR, lr_mult=MULT))
    lrs = _lrs(opt)
    trainable = [p for p in m.parameters() if p.requires_grad]
    # every trainable parameter exactly once, nothing else (the frozen teachers are absent)
    assert all(len(v) == 1 for v in lrs.values()) and set(lrs) == {id(p) for p in trainable}
    assert not {id(p) for p in m.teachers.parameters()} & set(lrs)
    head = {id(p) for p in m.student.head.parameters()}
    assert head == {id(m.student.head.weight), id(m.student.head.bias)}
    body = {id(p) for p in m.student.parameters()} - head
    owned = {id(p) for p in trainable} - head - body
    expected = {**{i: LR for i in body}, **{i: LR * 3.0 for i in head}, **{i: LR * 7.0 for i in owned}}
    assert {i: v[0] for i, v in lrs.items()} == expected  # exactly lr x multiplier, no rounding
    groups = {g["role"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups["head"] == head and groups["body"] == body and groups.get("method", set()) == owned
    assert [g["role"] for g in opt.param_groups] == [r for r in PARAM_ROLES if r in groups]
    assert all(g["weight_decay"] == TrainConfig().weight_decay for g in opt.param_groups)
    if name in OWNED:  # the method role is exactly the modules the method owns
        mods = {id(p) for attr in OWNED[name] for p in getattr(m, attr).parameters()}
        assert owned == mods and bool(owned) == bool(OWNED[name])


@pytest.mark.parametrize("name", TRAINABLE)
def test_default_multipliers_give_every_group_train_lr(name):
    m = _method(name)
    opt = method_optimizer(m, TrainConfig(lr=LR, optimizer="sgd", momentum=0.5))
    assert [g["lr"] for g in opt.param_groups] == [LR] * len(opt.param_groups)
    assert all(g["momentum"] == 0.5 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_default_multipliers_train_bitwise_like_one_group_of_all_parameters(optimizer):
    """Parity with the former single group: role groups at one rate change no number."""
    cfg = TrainConfig(lr=LR, optimizer=optimizer)
    a = _method("cka")
    b = copy.deepcopy(a)
    opt_a, opt_b = make_optimizer(a.parameters(), cfg), method_optimizer(b, cfg)
    assert len(opt_b.param_groups) == 3
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(3))
    tl, tf = a.teachers.outputs(x)
    batch = Batch(x=x, index=torch.arange(16), teacher_logits=tl, teacher_feats=tf)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            terms = m.loss_terms(batch)
            sum(m.weights()[t] * v for t, v in terms.items()).backward()
            opt.step()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_cosine_schedule_keeps_each_roles_ratio():
    m = _method("cfl")
    opt = method_optimizer(m, TrainConfig(lr=LR, lr_mult=MULT))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4)
    opt.step()
    sched.step()
    body, head, owned = (g["lr"] for g in opt.param_groups)
    assert 0 < body < LR and head == pytest.approx(3 * body) and owned == pytest.approx(7 * body)


def test_roles_must_cover_every_trainable_parameter_once():
    m = _method("cka")
    roles = m.param_roles()
    m.param_roles = lambda: {**roles, "method": roles["method"][1:]}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"^CKA.param_roles must hold each trainable parameter exactly once"):
        method_optimizer(m, TrainConfig())
    m.param_roles = lambda: {**roles, "body": roles["body"] + roles["head"]}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="exactly once"):
        method_optimizer(m, TrainConfig())


@pytest.mark.parametrize("arch", MODELS.names())
def test_every_student_architecture_exposes_its_classifier_as_the_head(arch):
    shape = (3, 32, 32)
    opts = {"mlp": {"hidden": 8}, "cnn": {"width": 4}, "resnet18": {"width": 4}, "wrn": {"depth": 10, "width": 1}}
    net = build_model(arch, shape, 7, **opts.get(arch, {}))
    head = net.head_parameters()
    assert [id(p) for p in head] == [id(net.head.weight), id(net.head.bias)]
    assert tuple(net.head.weight.shape) == (7, net.feature_dim)
    x = torch.rand(2, *shape)
    with torch.no_grad():  # the head maps the features to the logits: it is the classifier
        torch.testing.assert_close(net(x), net.head(net.features(x)))


# --------------------------------------------------------------------------- recipe and key


def _study(**train: object):
    return parse_study({**TINY, "train": {**TINY["train"], **train}}, "s.yaml")


def test_lr_mult_parses_and_defaults_to_one():
    assert _study().train.lr_mult.model_dump() == {"head": 1.0, "method": 1.0}
    s = _study(lr_mult={"head": 10, "method": 10})
    assert (s.train.lr_mult.head, s.train.lr_mult.method) == (10.0, 10.0)
    assert _study(lr_mult={"head": 2}).train.lr_mult.method == 1.0


def test_lr_mult_changes_the_trial_key_and_only_when_its_value_changes():
    def keys(study):
        return {(t.method, t.seed): t.key for t in expand(study) if t.method == "kd"}

    base = keys(_study())
    assert keys(_study(lr_mult={"head": 1.0, "method": 1})) == base  # the default, written out
    head, method = keys(_study(lr_mult={"head": 10})), keys(_study(lr_mult={"method": 10}))
    assert not set(base.values()) & set(head.values()) and not set(head.values()) & set(method.values())
    assert not set(base.values()) & set(method.values())


@pytest.mark.parametrize("lr_mult, message", [
    ({"head": 0}, "s.yaml: train.lr_mult.head: Input should be greater than 0"),
    ({"head": -1.5}, "s.yaml: train.lr_mult.head: Input should be greater than 0"),
    ({"method": 0}, "s.yaml: train.lr_mult.method: Input should be greater than 0"),
    ({"head": float("inf")}, "s.yaml: train.lr_mult.head: Input should be a finite number"),
    ({"body": 2}, "s.yaml: train.lr_mult.body: unknown field"),
    (10, "s.yaml: train.lr_mult: Input should be a valid dictionary"),
])
def test_a_bad_multiplier_is_a_one_line_error_naming_the_field(lr_mult, message):
    with pytest.raises(HarnessError) as e:
        _study(lr_mult=lr_mult)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_teachers_have_no_lr_mult():
    """Teachers train one group at their own ``lr``: ``lr_mult`` in a teacher entry is no recipe
    field, so it is read as a model option, and refused as one when the trials are expanded."""
    data = copy.deepcopy(TINY)
    data["teachers"][0]["lr_mult"] = {"head": 2}
    with pytest.raises(HarnessError, match=r"^teachers\[0\]\.lr_mult: unknown option for model 'cnn'"):
        expand(parse_study(data, "s.yaml"))


def test_a_bad_multiplier_in_a_study_file_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "lr_mult": {"head": 0}}}))
    assert main(["run-study", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"harness: error: {path}: train.lr_mult.head: Input should be greater than 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


# --------------------------------------------------------------------------- search


def _search(space: dict, **search: object):
    return parse_study({**TINY, "methods": {"kd": {}, "scratch": {}, "teachers": {}},
                        "search": {"space": space, "methods": ["kd"], **search}}, "s.yaml")


def test_lr_mult_head_and_method_are_tunable_paths():
    space = {"train.lr_mult.head": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
             "train.lr_mult.method": {"type": "categorical", "choices": [1.0, 10.0]}}
    plan = SearchPlan(_search(space))
    assert plan.paths["kd"] == ["train.lr_mult.head", "train.lr_mult.method"]
    assert plan.defaults("kd") == {"train.lr_mult.head": 1.0, "train.lr_mult.method": 1.0}
    s = plan.study_for("kd", {"train.lr_mult.head": 4.0, "train.lr_mult.method": 10.0})
    assert s.train.lr_mult.model_dump() == {"head": 4.0, "method": 10.0} and s.train.lr == TrainConfig().lr
    assert apply_params(_study(lr_mult={"method": 5}), {"train.lr_mult.head": 2.0}).train.lr_mult.method == 5.0


@pytest.mark.parametrize("path, dist, message", [
    ("train.lr_mult.head", {"type": "float", "low": 0.0, "high": 10.0},
     "search.space.train.lr_mult.head: value 0.0: Input should be greater than 0"),
    ("train.lr_mult", {"type": "float", "low": 1.0, "high": 10.0},
     "search.space.train.lr_mult: train.lr_mult is a mapping: search train.lr_mult.head or train.lr_mult.method"),
    ("train.lr_mult.body", {"type": "float", "low": 1.0, "high": 10.0},
     "search.space.train.lr_mult.body: train.lr_mult.body is not a train field; tunable: "),
    ("train.amp", {"type": "categorical", "choices": [True, False]},
     "search.space.train.amp: train.amp does not change what is learnt"),
])
def test_bad_lr_mult_search_paths_are_one_line_errors(path, dist, message):
    with pytest.raises(HarnessError) as e:
        SearchPlan(_search({path: dist}))
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
