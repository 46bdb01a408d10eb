"""The report's appendix: the study file as written, then only what the defaults filled in.

The study file comes as its author wrote it, comments kept (given on the command line, or logged
by the runner as ``study_source.yaml``); below it, the keys the file does not set with the values
the latest study run resolved them to (its ``study.yaml``), in compact flow style
(:func:`defaults_filled`, :func:`flow_yaml`). A store of an older runner has only the resolved
study: it is shown whole, in the same compact style. Absolute paths are redacted
(:func:`harness.report.paths.redact_paths`).
"""

from __future__ import annotations

from typing import Any

import yaml

from harness.report.paths import redact_paths


def defaults_filled(written: Any, resolved: Any) -> Any:
    """What ``resolved`` has that ``written`` does not set: a mapping of the keys absent from
    ``written`` (and, under a key both have, what is filled in below it); a list of mappings item
    by item (``{}`` for an item with nothing filled in) when both lists have the same length.
    None when nothing was filled in."""
    if isinstance(written, dict) and isinstance(resolved, dict):
        out = {}
        for key, value in resolved.items():
            if key not in written:
                out[key] = value
            elif (below := defaults_filled(written[key], value)) is not None:
                out[key] = below
        return out or None
    if (isinstance(written, list) and isinstance(resolved, list) and len(written) == len(resolved)
            and all(isinstance(r, dict) for r in resolved)):
        items = [defaults_filled(w, r) for w, r in zip(written, resolved)]
        return [x or {} for x in items] if any(x is not None for x in items) else None
    return None


def _flow(data: dict[str, Any], indent: str = "  ") -> list[str]:
    """A one-entry mapping in flow style without its outer braces (``key: {a: 1, ...}``), wrapped
    near 100 characters, continuation lines indented by ``indent``."""
    text = yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=100, allow_unicode=True).strip()
    lines = text[1:-1].splitlines()
    return [lines[0]] + [indent + x.strip() for x in lines[1:]]


def flow_yaml(data: dict[str, Any]) -> str:
    """A mapping as YAML with each top-level key's value in flow style (``train: {momentum: 0.9,
    ...}``), a list of mappings one item per line (``- {arch: cnn, ...}``)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(_flow({key: 0})[0].removesuffix(" 0"))
            for v in value:
                item = _flow({"x": v}, "    ")
                lines += ["- " + item[0].removeprefix("x: "), *item[1:]]
        else:
            lines += _flow({key: value})
    return "\n".join(lines) + "\n"


def _load(text: str | None) -> Any:
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None


def _block(text: str) -> str:
    return "```yaml\n" + redact_paths(text).rstrip() + "\n```\n"


def study_section(source: str | None, resolved: str | None) -> list[str]:
    """The Markdown paragraphs of the study file (as written, then the defaults filled in; or the
    resolved study alone); [] when neither is known."""
    if source:
        md = ["The study file as written:\n", _block(source)]
        written, full = _load(source), _load(resolved)
        if full is None:
            return md + ["The store has no resolved study of this experiment (no `study.yaml`), so the values the "
                         "defaults gave the keys the file does not set are not shown.\n"]
        filled = defaults_filled(written, full) if isinstance(written, dict) else None
        if not filled:
            return md + ["The file sets every key: no default was filled in.\n"]
        return md + ["Filled in by defaults (only the keys the file does not set, as the latest study run "
                     "resolved them):\n", _block(flow_yaml(filled))]
    if resolved:
        full = _load(resolved)
        text = flow_yaml(full) if isinstance(full, dict) else resolved
        return ["The study as resolved, every default filled in (the store has no copy of the file as written: "
                "its study run predates `study_source.yaml`):\n", _block(text)]
    return []
