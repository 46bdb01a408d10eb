"""The precision policy on a real GPU: under CUDA bf16 autocast, every loss term of CFL, CKA, CRD, KD and
RKD has a gradient that points where its float32 gradient points (cosine >= 0.99; CFL's MMD was
the term that did not), and every routing rule makes the same decisions as in float32. (In a
rehearsal: CPU bf16 autocast.)"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from harness.config import parse_study
from harness.data.splits import build_split
from harness.methods.base import Batch, Method, SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.trial import prepare_teachers
from tests.gpu.common import DEVICE, RULES, study


@contextlib.contextmanager
def arithmetic(bf16: bool) -> Iterator[None]:
    """bf16: the loop's (autocast, TF32 matmuls as ``harness.train`` allows them); else true float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16
    try:
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def setup(work: Path) -> dict[str, Any]:
    """The suite's digits split and teachers (from the shared cache), a fixed batch of 256."""
    spec = parse_study(study("precision", work))
    data = build_split(spec.splits[0], spec.dataset)
    records = prepare_teachers(spec, data, device=DEVICE)
    teachers = TeacherSet([r.net for r in records], [r.stats for r in records]).to(DEVICE)
    x = data.parts["train"].x[:256].to(DEVICE)
    with arithmetic(False):
        logits, feats = teachers.outputs(x)
        test_logits, test_feats = teachers.outputs(data.parts["test"].x.to(DEVICE))
    return {"data": data, "teachers": teachers, "batch": Batch(x, torch.arange(256), logits, feats),
            "test": (test_logits, test_feats)}


def build(name: str, setup: dict[str, Any], **params: Any) -> Method:
    data = setup["data"]
    torch.manual_seed(0)
    cls = get_method(name)
    student = build_model("cnn", data.in_shape, data.num_classes, width=8)
    method = cls(student, setup["teachers"], cls.ParamsModel.model_validate(params),
                 SplitInfo(tuple(data.sizes), tuple(data.offsets)))
    return method.to(DEVICE).train()


@pytest.mark.parametrize("name", ["cfl", "cka", "crd", "kd", "rkd"])
def test_bf16_gradients_follow_float32(setup: dict[str, Any], name: str) -> None:
    method = build(name, setup)
    params = [p for p in method.parameters() if p.requires_grad]
    initial = copy.deepcopy(method.state_dict())  # crd's memory grows and moves in each pass

    def gradients(bf16: bool) -> dict[str, torch.Tensor]:
        method.load_state_dict(initial)  # both passes start from the same state
        torch.manual_seed(1)  # whatever a term draws, it draws the same in both passes
        with arithmetic(bf16):
            terms = method.loss_terms(setup["batch"])
        out = {}
        for t, v in terms.items():
            gs = torch.autograd.grad(v.float(), params, retain_graph=True, allow_unused=True)
            out[t] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                for g, p in zip(gs, params)])
        return out

    full, low = gradients(False), gradients(True)
    assert full.keys() == low.keys() and full
    for t in full:
        if full[t].norm() == 0:  # a term without gradient at this batch (e.g. an inactive one)
            assert low[t].norm() == 0, t
            continue
        cos = F.cosine_similarity(full[t], low[t], dim=0).item()
        ratio = (low[t].norm() / full[t].norm()).item()
        assert cos >= 0.99 and 0.5 < ratio < 2.0, f"{name} loss/{t}: gradient cosine {cos:.4f}, norm ratio {ratio:.2f}"


def test_routing_decides_the_same_under_autocast(setup: dict[str, Any]) -> None:
    logits, feats = setup["test"]
    for rule in RULES:
        method = build("kd", setup, routing=rule).eval()
        with arithmetic(False):
            labels, k_star, _ = method.route(logits, feats)
        with arithmetic(True):
            labels_bf16, k_star_bf16, _ = method.route(logits, feats)
        assert torch.equal(k_star, k_star_bf16), f"{rule}: {(k_star != k_star_bf16).sum().item()} images change teacher"
        assert torch.equal(labels, labels_bf16), rule
