"""The estimate as text: the markdown table with its total line and caveats (:func:`render`), the
calibrated rates (:func:`print_rates`), and durations and hours as the table writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.estimate.arithmetic import Estimate


def format_duration(seconds: float) -> str:
    """``42s``, ``4m 10s``, ``3h 05m``, ``2d 04h``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _hours(h: float) -> str:
    """Hours with 3 decimals (1 from 10 h on), two significant digits below 0.01 h."""
    if h >= 10:
        return f"{h:.1f}"
    return f"{h:.3f}" if h >= 0.01 or h == 0 else f"{h:.2g}"


def render(est: Estimate) -> list[str]:
    """The estimate as markdown lines: the table (split, teachers, trials, device-hours), the
    total line, the device caveat and what is included."""
    lines = [f"estimate for study {est.study} on {est.pool} (calibrated on {est.device} in "
             f"{est.calibration_seconds:.0f}s, {len(est.rates)} combinations)", "",
             "| split | teachers (h) | trials (n) | trials (h) | device-hours |", "|---|---:|---:|---:|---:|"]
    for r in est.rows:
        cached = f" ({r.teachers_cached} of {r.teachers} cached)" if r.teachers_cached else ""
        lines.append(f"| {r.split} | {_hours(r.teacher_seconds / 3600)}{cached} | {r.trials} | "
                     f"{_hours(r.trial_seconds / 3600)} | {_hours(r.device_hours)} |")
    o = est.overheads
    lines += ["", f"total: {_hours(est.device_hours)} device-hours; estimated wall time "
                  f"{format_duration(est.wall_seconds)} (start-up {format_duration(o.startup)}, teachers "
                  f"{format_duration(est.teacher_stage_seconds)}, trials {format_duration(est.makespan_seconds)} "
                  f"on {est.slots} slot{'s' * (est.slots != 1)})"]
    if not est.device.startswith("cuda"):
        lines.append(f"estimated on {est.device}: a GPU run will differ")
    lines.append("includes start-up, teacher training with routing statistics and pool outputs (cached teachers "
                 "cost 0), every trial's training, validation, test passes, diagnostics, set-up and MLflow "
                 "requests; not the report, compilation, retries or trials already finished")
    return lines


def print_rates(est: Estimate) -> None:
    for combo, r in est.rates.items():
        extra = "stats" if combo.startswith("teacher ") else "diagnostics"
        print(f"  {combo}: train {r.train * 1e3:.3f} ms/img, eval {r.eval * 1e3:.3f} ms/img, "
              f"{extra} {r.extra * 1e3:.3f} ms/img" + (f", set-up {r.fixed:.2f}s" if r.fixed else ""))
