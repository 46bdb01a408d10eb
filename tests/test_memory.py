"""Memory at CIFAR scale: routing statistics and claim scores work in bounded row chunks.

Measured, not inferred: a fresh Python process fits one teacher's routing statistics on 50,000
synthetic 512-d features of 50 classes (every claim score, Mahalanobis and k-NN included, on
every training image; Ledoit-Wolf; the validation bank; the background of ``rmd`` on the pool) and routes the training images, and reports the growth of its peak resident
set size (``ru_maxrss``, which sees torch's allocations; tracemalloc does not). The [N, C, d]
tensor of an unchunked Mahalanobis score alone would be 50,000 x 50 x 512 x 4 B = 5.1 GB; the
process runs under an address-space limit of a few GB over its start, so code that builds it
fails at once instead of swapping the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

N, C, D, M = 50_000, 50, 512, 1_000
FULL_TENSOR_MB = N * C * D * 4 / 2**20  # 4883 MiB

SCRIPT = textwrap.dedent(
    f"""
    import json, resource, torch
    from harness.routing import RoutingConfig, fit_background, fit_stats, route

    def vm_bytes():
        return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()

    def maxrss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    class FeatureNet(torch.nn.Module):
        \"\"\"A teacher whose features are its inputs and whose logits are W f.\"\"\"
        def __init__(self, w):
            super().__init__()
            self.register_buffer("w", w)
        def forward_both(self, x):
            return x @ self.w.T, x

    g = torch.Generator().manual_seed(0)
    centres = torch.randn({C}, {D}, generator=g)
    y = torch.arange({N}) % {C}
    x = centres[y] + 2 * torch.randn({N}, {D}, generator=g)
    x_val = centres[torch.arange({M}) % {C}] + 2 * torch.randn({M}, {D}, generator=g)
    net = FeatureNet(centres / {D} ** 0.5)
    fit_stats(net, x[:2000], y[:2000], x_val[:200])  # warm up: libraries loaded, pools in place
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 3 * 2**30, resource.RLIM_INFINITY))
    base = maxrss_mb()
    stats = fit_stats(net, x, y, x_val, background=fit_background(x))  # the pool: the training images
    logits, feats = net.forward_both(x)
    claims = {{}}
    for rule in ("max_logit/z", "knn/percentile", "rmd/z"):  # (fit_stats scored every image with every score)
        claims[rule] = torch.bincount(route([logits], [feats], [stats], RoutingConfig.parse(rule), (0,))[1]).tolist()
    print(json.dumps({{"base_mb": base, "extra_mb": maxrss_mb() - base, "claims": claims,
                      "shapes": [list(stats.means.shape), list(stats.bank.shape), list(stats.val_sorted.shape)]}}))
    """
)


@pytest.mark.slow
def test_routing_statistics_and_scores_at_cifar_scale_stay_far_below_the_full_tensor():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shapes"] == [[C, D], [M, D], [7, M]]
    assert out["claims"] == {"max_logit/z": [N], "knn/percentile": [N], "rmd/z": [N]}
    # the inputs (x: 100 MB) are held before the measurement; what fitting and routing add on top:
    # outputs and centred float64 features (~300 MB), Ledoit-Wolf's copies (~400 MB), one chunk
    assert out["extra_mb"] < 1200, out
    assert out["extra_mb"] < FULL_TENSOR_MB / 4
