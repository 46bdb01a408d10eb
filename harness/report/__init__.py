"""Reports: MLflow store -> pandas frames -> tables, statistics and seaborn figures.

``build_report(study)`` rebuilds ``results/<study>/`` from the tracking store alone. Nothing in
this package imports torch (the report runs where only the store is available).

Modules: :mod:`.frames` (MLflow -> pandas), :mod:`.stats` (mean ± std, paired tests, bootstrap),
:mod:`.tables` (comparison/ablation frames, Markdown, LaTeX and figures), :mod:`.figures` (the
figures' shared style: palette, figure, save; each figure is drawn in its section's module),
:mod:`.tuning` (the Optuna searches of ``harness tune``: summary, best vs default parameters,
fANOVA importances, ``tuning.csv`` and figures), :mod:`.appendix` (the study file as written
and what the defaults filled in), :mod:`.build` (the report folder), :mod:`.reproduce` (whether
a rebuild reproduces the report committed in git).
"""

from harness.report.build import build_report

__all__ = ["build_report"]
