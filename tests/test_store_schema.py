"""The MLflow store's schema is :mod:`harness.store`: no other module of ``harness/`` or
``baselines/`` spells a tag, and the schema's own names are tags, kinds and artifacts as named.

A module *spells a tag* when its source (read with :mod:`ast`; docstrings and other bare string
statements left out) holds

- a string starting with ``"harness."`` that is not the name of a module (``"harness.trial"`` in a
  preload list is one; a module name that is also a tag, such as the entry-point group
  ``"harness.methods"``, is excused only where :data:`ALLOWED` lists it), or
- an f-string formatting the name ``TAG`` (``f"{TAG}kind"``, ``f"tags.`{TAG}kind`"``), or any
  other use of the name ``TAG`` (``TAG + "kind"``): a tag built outside the schema.

Each offender is named by file and line; the fix is the constant of :mod:`harness.store` (add one
there, with its comment, if the tag is new).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import harness.store as store

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "harness" / "store.py"

#: ``(file, string)``: a ``"harness.*"`` string that names a module or an entry-point group, in a
#: file where it is not a tag although a tag of the schema has the same name
ALLOWED = {
    # the entry-point group the methods register under (METHODS, the experiment tag, is the same text)
    ("harness/methods/base.py", "harness.methods"),
}


def sources() -> list[Path]:
    return [p for d in ("harness", "baselines") for p in sorted((ROOT / d).rglob("*.py")) if p != SCHEMA]


def _docs(tree: ast.AST) -> set[int]:
    """ids of the string constants that are statements of their own (docstrings, attribute docs)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package, an empty part ("harness.")
        return False


def tag_values() -> set[str]:
    return {v for k, v in vars(store).items() if k.isupper() and isinstance(v, str) and v.startswith(store.TAG)}


def spelled_tags(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: what`` for each tag spelled in ``path`` (``file`` relative to ``root``)."""
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), str(path))
    docs, tags, found = _docs(tree), tag_values(), []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                and node.value.startswith(store.TAG)):
            text = node.value
            if (_is_module(text) and text not in tags) or (rel, text) in ALLOWED:
                continue
            found.append(f"{rel}:{node.lineno}: the string {text!r} (a tag: use its constant in harness.store)")
        elif isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id == "TAG"
                for v in node.values):
            found.append(f"{rel}:{node.lineno}: the f-string {ast.unparse(node)} (a tag built from TAG: use its "
                         "constant in harness.store)")
    formatted = {id(v.value) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)
                 for v in n.values if isinstance(v, ast.FormattedValue)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "TAG" and id(node) not in formatted \
                and isinstance(node.ctx, ast.Load):
            found.append(f"{rel}:{node.lineno}: the name TAG (a tag built outside harness.store)")
    return found


def test_no_module_but_the_schema_spells_a_tag():
    found = [line for p in sources() for line in spelled_tags(p)]
    assert not found, f"{len(found)} tags spelled outside harness/store.py:\n" + "\n".join(found)


def test_the_allowed_strings_are_modules_or_entry_point_groups_still_in_their_files():
    for rel, text in ALLOWED:
        assert _is_module(text), f"{text} is not a module"
        assert repr(text) in (ROOT / rel).read_text().replace('"', "'"), f"{rel} no longer holds {text!r}: drop it"


def test_the_checker_finds_every_form(tmp_path: Path):
    """The reader itself: each spelling is found, module names and docstrings are not."""
    bad = tmp_path / "harness" / "bad.py"
    bad.parent.mkdir()
    bad.write_text('"""The ``harness.kind`` tag (a docstring)."""\n'
                   "from harness.store import TAG\n"
                   'PRELOAD = ("harness.trial", "harness.tune")\n'
                   'a = {"harness.kind": "trial"}\n'
                   'b = f"{TAG}kind"\n'
                   'c = f"tags.`{TAG}kind` = 1"\n'
                   'd = TAG + "seed"\n'
                   'e = "harness.methods"\n'
                   'f = f"harness.{b}"\n')
    found = spelled_tags(bad, tmp_path)
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [4, 5, 6, 7, 8, 9], found  # harness.methods is also a tag (METHODS): not in its allowed file


# -- the schema's own names ---------------------------------------------------------------------------
def _constants() -> list[tuple[str, ast.Assign, str]]:
    """(name, assignment, its source line) of each module-level UPPER_CASE constant of harness.store."""
    text = SCHEMA.read_text()
    lines = text.splitlines()
    out = []
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                out.append((name, node, lines[node.lineno - 1]))
    return out


def _role(name: str) -> str:
    if name == "TAG":
        return "prefix"
    if name.startswith("KIND_"):
        return "kind"
    if name.endswith(("_ARTIFACT", "_ARTIFACTS")):
        return "artifact"
    if name == "PROVENANCE_TAGS":
        return "mapping"
    return "tag"


def test_every_tag_is_a_harness_name_and_every_kind_and_artifact_is_not():
    bad = []
    for name, _, _ in _constants():
        value, role = getattr(store, name), _role(name)
        if role == "tag" and not re.fullmatch(r"harness\.[a-z][a-z0-9_]*", value):
            bad.append(f"{name} = {value!r}: a tag is harness.<lower_case name>")
        elif role == "kind" and not re.fullmatch(r"[a-z][a-z_]*", value):
            bad.append(f"{name} = {value!r}: a run kind is a lower_case word")
        elif role == "artifact" and (value.startswith(store.TAG) or "/" in value):
            bad.append(f"{name} = {value!r}: an artifact is a file or folder name")
    assert store.TAG == "harness."
    assert not bad, "\n".join(bad)


def test_each_name_once_unless_aliased_and_each_commented():
    """No two constants hold the same text unless one is written as the other (``X = Y``), and each
    tag, kind and artifact has its comment on its line (TAG's is above it)."""
    by_value: dict[str, list[str]] = defaultdict(list)
    uncommented = []
    for name, node, line in _constants():
        value = getattr(store, name)
        if isinstance(value, str) and not isinstance(node.value, ast.Name):
            by_value[value].append(name)
        if _role(name) in ("tag", "kind", "artifact") and "  # " not in line:
            uncommented.append(name)
    twice = {v: names for v, names in by_value.items() if len(names) > 1}
    assert not twice, f"constants with the same value: {twice}"
    assert not uncommented, f"constants without a comment on their line: {uncommented}"


def test_the_provenance_columns_are_its_tags():
    tags = tag_values()
    assert set(store.PROVENANCE_TAGS.values()) <= tags
    assert all(tag == store.TAG + column for column, tag in store.PROVENANCE_TAGS.items())


def test_the_kinds_are_the_run_kinds_the_harness_writes():
    kinds = {v for k, v in vars(store).items() if k.startswith("KIND_")}
    assert kinds == {"study", "teacher_stage", "teacher", "trial", "search", "tune_trial", "tune_run", "bench",
                     "benchmark"}
