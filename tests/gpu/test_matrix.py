"""Every method x every routing rule for 2 epochs on digits, on the GPU: bf16 autocast on and
off, ``torch.compile`` on and off, channels_last (automatic on CUDA), 8 trials packed on the GPU.
Batches of 32, so that 2 epochs (76 steps) train: on the CPU, the supervised student reaches
about 0.75 union accuracy, KD with the default rule about 0.47 (chance: 0.1)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from harness.store import TAG
from tests.gpu.common import (
    AMP_PRECISION, DEVICE, FEW_RULES, ON_GPU, RULES, TEST_IMAGES, assert_all_finished, expected_trials, metric,
    methods, run, study, trains,
)

CONFIGS = [  # (train.amp, train.compile, rules): compile changes the student only, so fewer rules
    pytest.param(True, False, RULES, id="amp-eager"),
    pytest.param(False, False, RULES, id="fp32-eager"),
    pytest.param(True, True, FEW_RULES, id="amp-compiled"),
    pytest.param(False, True, FEW_RULES, id="fp32-compiled"),
]


@pytest.mark.parametrize("amp, compile_, rules", CONFIGS)
def test_every_method_and_rule_trains_on_the_gpu(work: Path, amp: bool, compile_: bool, rules: list[str]) -> None:
    names = methods()
    assert {"cka", "kd", "cfl", "scratch", "teachers"} <= set(names)
    name = f"matrix-{'amp' if amp else 'fp32'}-{'compiled' if compile_ else 'eager'}"
    spec = study(name, work, methods={m: {} for m in names}, routing=rules, trials_per_device=8,
                 train={"amp": amp, "compile": compile_, "batch_size": 32})
    runs = run(spec, work)
    assert_all_finished(runs, expected_trials(names, rules))
    precision = AMP_PRECISION if amp else "fp32"
    ensemble = defaultdict(list)  # rule -> the routed teachers' test accuracy, as each trial measured it
    for r in runs:
        tags, method, variant = r.data.tags, r.data.tags[f"{TAG}method"], r.data.tags[f"{TAG}variant"]
        assert tags[f"{TAG}device"] == DEVICE and tags[f"{TAG}precision"] == precision, tags
        acc = metric(r, "test/union_acc")
        assert 0.0 <= acc <= 1.0
        if ON_GPU:
            assert metric(r, "cuda_max_allocated_mb") > 0  # the trial's tensors were on the GPU
        if trains(method):
            metric(r, "loss/total")
        else:  # the teachers' row: its union accuracy is the routed ensemble's, in two code paths
            assert abs(acc - metric(r, "diag/ensemble_union_acc")) <= 1 / TEST_IMAGES + 1e-9, variant
        if method == "scratch":
            assert acc > 0.5, acc  # labels: the loop trains
        if method == "kd" and variant == "full":
            assert acc > 0.25, acc  # the default rule's targets teach
        if method in ("kd", "cka", "teachers"):
            ensemble[variant].append(metric(r, "diag/ensemble_union_acc"))
    assert len(ensemble) == len(rules)
    for variant, values in ensemble.items():  # one rule, one routing, whichever method's trial routes
        assert len(values) == 3 and max(values) - min(values) <= 1 / TEST_IMAGES + 1e-9, (variant, values)
