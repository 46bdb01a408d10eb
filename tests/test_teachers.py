"""Teacher cache: miss trains and writes, hit loads the same weights, corrupt entries retrain."""

from __future__ import annotations

import pytest
import torch

from harness.config import DatasetConfig, SplitConfig, TeacherConfig
from harness.data.splits import build_split
from harness.keys import stable_hash
from harness.teachers import cache_root, get_teachers, teacher_spec

DS = DatasetConfig(name="digits")
SPLIT = build_split(SplitConfig(name="s", tasks=[[0, 1, 2], [3, 4]]), DS)
CFGS = [TeacherConfig(arch="cnn", width=4, epochs=2, batch_size=32, lr=0.01), TeacherConfig(arch="mlp", hidden=16, epochs=2, batch_size=32, lr=0.01)]


def _entries(root):
    """The teacher checkpoints (not their routing statistics or the split's pool outputs)."""
    return sorted(p for p in (root / "teachers").glob("*.pt") if "-routing-" not in p.name and not p.name.startswith("outputs-"))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_miss_then_hit(tmp_path):
    seen = []
    first = get_teachers(SPLIT, DS, CFGS, str(tmp_path), on_ready=seen.append)
    assert [r.cached for r in first] == [False, False] and len(_entries(tmp_path)) == 2
    assert seen == first
    assert [r.net.num_classes for r in first] == [3, 2] and first[1].net.feature_dim == 16
    acc = first[0].metrics["test/union_acc_best"]
    assert 0.5 < acc <= 1.0  # a real (if short) supervised training on 3 digit classes
    second = get_teachers(SPLIT, DS, CFGS, str(tmp_path))
    assert [r.cached for r in second] == [True, True]
    assert all(_same(a.net, b.net) for a, b in zip(first, second))
    assert second[0].metrics == first[0].metrics and len(second[0].history) == 2


def test_key_covers_what_determines_a_teacher():
    base = stable_hash(teacher_spec(SPLIT, 0, DS, CFGS[0]))
    assert base == stable_hash(teacher_spec(SPLIT, 0, DS, TeacherConfig(arch="cnn", width=4, epochs=2, batch_size=32, lr=0.01)))
    changed = [
        teacher_spec(SPLIT, 0, DS, TeacherConfig(arch="cnn", width=4, epochs=3, batch_size=32, lr=0.01)),
        teacher_spec(SPLIT, 0, DS, TeacherConfig(arch="cnn", width=5, epochs=2, batch_size=32, lr=0.01)),
        teacher_spec(SPLIT, 0, DS, TeacherConfig(arch="cnn", width=4, epochs=2, batch_size=32, lr=0.01, seed=1)),
        teacher_spec(SPLIT, 0, DS, TeacherConfig(arch="cnn", width=4, epochs=2, batch_size=32, lr=0.02)),
        teacher_spec(SPLIT, 0, DatasetConfig(name="digits", val_fraction=0.2), CFGS[0]),
        teacher_spec(SPLIT, 1, DS, CFGS[0]),
    ]
    assert len({base, *map(stable_hash, changed)}) == 1 + len(changed)


@pytest.mark.parametrize("garbage", [b"not a checkpoint", b""])
def test_corrupt_entry_is_retrained(tmp_path, garbage):
    first = get_teachers(SPLIT, DS, CFGS[:1] * 2, str(tmp_path))
    path = tmp_path / "teachers" / f"{first[0].key}.pt"
    path.write_bytes(garbage)
    with pytest.warns(UserWarning, match="unreadable"):
        again = get_teachers(SPLIT, DS, CFGS[:1] * 2, str(tmp_path))
    assert again[0].cached is False and _same(again[0].net, first[0].net)  # same seed, same weights
    assert torch.load(path, weights_only=True)["meta"]["key"] == again[0].key


def test_entry_of_other_architecture_is_not_trusted(tmp_path):
    rec = get_teachers(SPLIT, DS, CFGS[:1], str(tmp_path))[0]
    path = _entries(tmp_path)[0]
    other = get_teachers(SPLIT, DS, CFGS[1:], str(tmp_path / "o"))[0]
    torch.save({"state_dict": other.net.state_dict(), "meta": {"key": rec.key, "metrics": {}}}, path)
    with pytest.warns(UserWarning, match="unreadable"):
        again = get_teachers(SPLIT, DS, CFGS[:1], str(tmp_path))[0]
    assert again.cached is False


def test_cache_root_resolution(monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", "/x/y")
    assert str(cache_root(None)) == "/x/y" and str(cache_root("/a")) == "/a"
    monkeypatch.delenv("HARNESS_CACHE")
    assert str(cache_root(None)) == ".harness_cache"


def test_routing_stats_fitted_on_own_data_and_cached(tmp_path):
    recs = get_teachers(SPLIT, DS, CFGS, str(tmp_path))
    stats_files = sorted((tmp_path / "teachers").glob("*-routing-*.pt"))
    assert len(stats_files) == 2 and all(r.key in f.name for r, f in zip(sorted(recs, key=lambda r: r.key), stats_files))
    st = recs[0].stats
    x, y = SPLIT.task_part(0, "train")
    with torch.no_grad():
        f = recs[0].net.features(x)
    # class means are teacher 0's own training features per class (3 classes, not 5)
    assert st.means.shape == (3, recs[0].net.feature_dim)
    assert torch.allclose(st.means[1], f[y == 1].mean(0), atol=1e-5)
    assert st.bank.shape[0] == len(SPLIT.task_part(0, "val")[1])
    again = get_teachers(SPLIT, DS, CFGS, str(tmp_path))
    assert torch.equal(again[0].stats.precision, st.precision)


def test_cached_routing_stats_move_with_the_teachers_and_stay_out_of_state_dicts(tmp_path):
    from harness.methods.base import TeacherSet
    from harness.routing import TeacherStats

    STAT_TENSORS = ("means", "precision", "bank", "z_mean", "z_std", "val_sorted", "bg_mean", "bg_precision")
    fitted = get_teachers(SPLIT, DS, CFGS, str(tmp_path))
    path = sorted((tmp_path / "teachers").glob("*-routing-*.pt"))[0]
    blob = torch.load(path, weights_only=True)  # the cache format: plain CPU tensors and knn_k
    assert set(blob) == {*STAT_TENSORS, "knn_k"} and all(blob[k].device.type == "cpu" for k in STAT_TENSORS)
    loaded = get_teachers(SPLIT, DS, CFGS, str(tmp_path))
    assert all(isinstance(r.stats, TeacherStats) for r in loaded)
    assert all(torch.equal(getattr(a.stats, k), getattr(b.stats, k)) for a, b in zip(fitted, loaded) for k in STAT_TENSORS)
    teachers = TeacherSet([r.net for r in loaded], [r.stats for r in loaded])
    before = set(TeacherSet([r.net for r in loaded]).state_dict())
    assert set(teachers.state_dict()) == before  # checkpoints of methods keep their keys
    teachers.to(torch.float64)  # whatever .to does to the teachers, it does to their statistics
    assert all(getattr(r.stats, k).dtype == torch.float64 for r in loaded for k in ("means", "precision", "bank", "bg_precision"))
    with pytest.raises(ValueError, match="1 of 2 teachers"):
        TeacherSet([r.net for r in loaded], [loaded[0].stats, None])


def test_teacher_outputs_cached_once_per_split(tmp_path):
    from harness.methods.base import TeacherSet
    from harness.teachers import cached_outputs

    recs = get_teachers(SPLIT, DS, CFGS, str(tmp_path))
    logits, feats = cached_outputs(recs, SPLIT, str(tmp_path))
    files = list((tmp_path / "teachers").glob("outputs-*.pt"))
    assert len(files) == 1
    direct = TeacherSet([r.net for r in recs]).outputs(SPLIT.parts["train"].x)
    assert all(torch.allclose(a, b) for a, b in zip(logits, direct[0]))
    assert [f.shape[1] for f in feats] == [r.net.feature_dim for r in recs]
    mtime = files[0].stat().st_mtime_ns
    again = cached_outputs(recs, SPLIT, str(tmp_path))
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again[0][1], logits[1])
    files[0].write_bytes(b"junk")
    with pytest.warns(UserWarning, match="unreadable"):
        fixed = cached_outputs(recs, SPLIT, str(tmp_path))
    assert torch.equal(fixed[0][0], logits[0])


# --------------------------------------------------------------------------- weight digests

MLP = TeacherConfig(arch="mlp", hidden=16, epochs=2, batch_size=32, lr=0.01)


def test_state_digest_covers_names_dtypes_shapes_and_values():
    from harness.teachers import state_digest

    base = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.n": torch.tensor(3)}
    d = state_digest(base)
    assert len(d) == 64 and d == state_digest({k: v.clone() for k, v in base.items()})
    assert d == state_digest({k: v.t().contiguous().t() for k, v in base.items()})  # memory layout: same digest
    changed = [
        {**base, "a.weight": torch.where(base["a.weight"] == 5, 5.5, base["a.weight"])},  # one value
        {**base, "a.weight": base["a.weight"].reshape(3, 2)},  # same bytes, other shape
        {**base, "a.weight": base["a.weight"].view(torch.int32)},  # same bytes, other dtype
        {"b.weight": base["a.weight"], "a.n": base["a.n"]},  # other name
        {"a.n": base["a.n"], "a.weight": base["a.weight"]},  # other order
    ]
    assert len({d, *map(state_digest, changed)}) == 1 + len(changed)
    half = [state_digest({"x": torch.ones(2, dtype=dt)}) for dt in (torch.bfloat16, torch.float16)]
    assert half[0] != half[1]


def test_derived_caches_follow_the_weights_not_the_config(tmp_path):
    """The entry of teacher 0 comes to hold other weights under its key, with their own valid digest
    (a corrupt entry retrained on a non-deterministic GPU does that). Its routing statistics and the
    split's teacher outputs are then those of the new weights, exactly as a clean cache computes them,
    never the old ones found under the same config."""
    from harness.teachers import cached_outputs, checkpoint_path, state_digest

    root, clean_root = tmp_path / "c", tmp_path / "clean"
    first = get_teachers(SPLIT, DS, [MLP, MLP], str(root))
    old_out = cached_outputs(first, SPLIT, str(root))
    # a clean cache whose teacher 0 has the new weights (trained with another seed)
    clean = get_teachers(SPLIT, DS, [MLP.model_copy(update={"seed": 1}), MLP], str(clean_root))
    clean_out = cached_outputs(clean, SPLIT, str(clean_root))
    assert not _same(clean[0].net, first[0].net)
    new_state = clean[0].net.state_dict()
    torch.save({"state_dict": new_state, "meta": {"key": first[0].key, "digest": state_digest(new_state),
                                                  "metrics": clean[0].metrics, "history": []}},
               checkpoint_path(first[0].key, str(root)))

    again = get_teachers(SPLIT, DS, [MLP, MLP], str(root))
    assert again[0].cached and _same(again[0].net, clean[0].net)
    assert again[0].digest == clean[0].digest != first[0].digest and again[1].digest == first[1].digest
    for name in ("means", "precision", "bank", "z_mean", "z_std", "val_sorted", "bg_mean", "bg_precision"):
        assert torch.equal(getattr(again[0].stats, name), getattr(clean[0].stats, name)), name
        assert torch.equal(getattr(again[1].stats, name), getattr(first[1].stats, name)), name
    assert not torch.equal(again[0].stats.means, first[0].stats.means)
    logits, feats = cached_outputs(again, SPLIT, str(root))
    assert all(torch.equal(a, b) for a, b in zip(logits + feats, clean_out[0] + clean_out[1]))
    assert not torch.equal(logits[0], old_out[0][0])


def test_weights_that_do_not_match_their_digest_are_retrained(tmp_path):
    from harness.teachers import checkpoint_path, state_digest

    first = get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))
    path = checkpoint_path(first[0].key, str(tmp_path))
    blob = torch.load(path, weights_only=True)
    assert blob["meta"]["digest"] == first[0].digest == state_digest(first[0].net.state_dict())
    # the weights changed under a digest that still names the trained ones (bit rot, a bad copy)
    tampered = {k: v + 1e-3 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    torch.save({**blob, "state_dict": tampered}, path)
    with pytest.warns(UserWarning, match="does not match its digest"):
        again = get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))
    assert [r.cached for r in again] == [False, True] and _same(again[0].net, first[0].net)
    assert torch.equal(again[0].stats.precision, first[0].stats.precision)
    # an entry of the format before digests cannot be verified: retrained too
    torch.save({"state_dict": blob["state_dict"], "meta": {"key": first[0].key, "metrics": {}}}, path)
    with pytest.warns(UserWarning, match="has no digest"):
        assert get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))[0].cached is False
    assert torch.load(path, weights_only=True)["meta"]["digest"] == first[0].digest


def test_cache_files_are_those_of_the_current_weights(tmp_path):
    """What a worker without this file system is sent: checkpoints, the routing statistics of the
    weights they hold (not those of older weights of the same key), the split's outputs."""
    import shutil

    from harness.teachers import cache_files, checkpoint_path, outputs_path, stats_path

    recs = get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))
    stale = stats_path(recs[0], str(tmp_path)).with_name(f"{recs[0].key}-routing-{'0' * 16}-x.pt")
    shutil.copy(stats_path(recs[0], str(tmp_path)), stale)
    files = cache_files(recs, SPLIT, str(tmp_path))  # the pool's outputs come with the teachers
    assert files == [checkpoint_path(r.key, str(tmp_path)) for r in recs] + [
        stats_path(r, str(tmp_path)) for r in recs] + [outputs_path(recs, SPLIT, str(tmp_path))]
    assert stale not in files
    assert all(r.digest[:16] in stats_path(r, str(tmp_path)).name for r in recs)
    assert all(len(r.pool) == 64 and r.pool[:16] in stats_path(r, str(tmp_path)).name for r in recs)


# --------------------------------------------------------------------------- the pool's background (rmd)


def test_rmd_background_is_fitted_on_the_pool_without_labels(tmp_path):
    """The background of ``rmd`` is the Gaussian of each teacher's features on the pool (the split's
    training images, every task's): refitting it by hand from those features gives the same
    statistics, and the pool's labels cannot move it (other tasks' labels scrambled: the same)."""
    import dataclasses

    from harness.routing import fit_background
    from harness.teachers import cached_outputs, pool_digest

    recs = get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))
    _, feats = cached_outputs(recs, SPLIT, str(tmp_path))
    with torch.no_grad():
        pool = recs[0].net.features(SPLIT.parts["train"].x)
    assert torch.allclose(feats[0], pool, atol=1e-6) and recs[0].pool == pool_digest(feats[0])
    mu, prec = fit_background(feats[0])
    assert torch.equal(recs[0].stats.bg_mean, mu) and torch.equal(recs[0].stats.bg_precision, prec)
    assert torch.allclose(mu, pool.mean(0), atol=1e-5)  # the whole pool, not teacher 0's own images
    assert not torch.allclose(mu, pool[SPLIT.parts["train"].t == 0].mean(0), atol=1e-2)
    # scramble the union labels of task 1's pool images (teacher 0's own data stays as it is)
    train = SPLIT.parts["train"]
    other = (train.t == 1).nonzero()[:, 0]
    y = train.y.clone()
    y[other] = y[other][torch.randperm(len(other), generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(y, train.y)
    scrambled = dataclasses.replace(SPLIT, parts={**SPLIT.parts, "train": dataclasses.replace(train, y=y)})
    again = get_teachers(scrambled, DS, [MLP, MLP], str(tmp_path / "fresh"))  # refitted from scratch
    assert _same(again[0].net, recs[0].net) and torch.equal(again[0].stats.bg_precision, recs[0].stats.bg_precision)
    assert torch.equal(again[0].stats.bg_mean, recs[0].stats.bg_mean)


def test_a_change_of_pool_refits_the_background(tmp_path):
    """Teacher 0 (classes 0-2) in a split with a third task: the same checkpoint (its key is its own
    data), but a larger pool, so new routing statistics: a background fitted on the new pool, the
    own-data statistics unchanged, each pool's statistics cached under their own name."""
    from harness.routing import fit_background
    from harness.teachers import cached_outputs, stats_path

    two = get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))
    bigger = build_split(SplitConfig(name="s3", tasks=[[0, 1, 2], [3, 4], [5, 6]]), DS)
    three = get_teachers(bigger, DS, [MLP, MLP, MLP], str(tmp_path))
    assert three[0].cached and three[0].digest == two[0].digest and three[0].pool != two[0].pool
    assert stats_path(three[0], str(tmp_path)) != stats_path(two[0], str(tmp_path))
    assert stats_path(two[0], str(tmp_path)).exists() and stats_path(three[0], str(tmp_path)).exists()
    _, feats = cached_outputs(three, bigger, str(tmp_path))
    assert len(feats[0]) == len(bigger.parts["train"]) > len(SPLIT.parts["train"])
    mu, prec = fit_background(feats[0])
    assert torch.equal(three[0].stats.bg_mean, mu) and torch.equal(three[0].stats.bg_precision, prec)
    assert not torch.allclose(three[0].stats.bg_mean, two[0].stats.bg_mean, atol=1e-3)
    for name in ("means", "precision", "bank"):  # its own data did not change
        assert torch.equal(getattr(three[0].stats, name), getattr(two[0].stats, name)), name
    # back to the first pool: its cached statistics, not those of the last pool
    back = get_teachers(SPLIT, DS, [MLP, MLP], str(tmp_path))
    assert torch.equal(back[0].stats.bg_precision, two[0].stats.bg_precision)
