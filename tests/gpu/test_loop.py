"""The training loop itself on a GPU, in this process: channels_last on CUDA, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from harness.config import DatasetConfig, SplitConfig, TrainConfig
from harness.data.splits import build_split
from harness.methods.base import SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.train import fit
from tests.gpu.common import DEVICE, gpu_only


@gpu_only
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_channels_last_student_trains_on_cuda(compile_: bool) -> None:
    data = build_split(SplitConfig(name="2x5", tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]), DatasetConfig(name="digits"))
    torch.manual_seed(0)
    teachers = TeacherSet([build_model("cnn", data.in_shape, 5, width=8) for _ in range(2)])
    student = build_model("cnn", data.in_shape, 10, width=8)
    cls = get_method("kd")
    method = cls(student, teachers, cls.ParamsModel(), SplitInfo(tuple(data.sizes), tuple(data.offsets)))
    res = fit(method, data, TrainConfig(epochs=2, batch_size=128, compile=compile_), seed=0, device=DEVICE)
    convs = [m for m in student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.device.type == "cuda" for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert 0.0 <= res.final["test/union_acc"] <= 1.0 and len(res.history) == 2
    assert all(h["cuda_max_allocated_mb"] > 0 for h in res.history)
