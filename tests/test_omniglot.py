"""Omniglot: shipped files, integrity checks, splits, episode sampler, Lake's runs.

Every test uses only the files shipped in metacore/data/, except the two that compare them
with the project's offline copy in ../shared/data/omniglot (skipped when it is absent).
"""
import hashlib
import importlib.util
import io
import os
import random
import shutil

import numpy as np
import pytest

from metacore.data import omniglot as og
from metacore.data.omniglot import (EpisodeSampler, lake_episodes, lake_run, load_omniglot,
                                    split_characters)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "omniglot"))
needs_shared = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED, "omniglot_background.npz")),
    reason=f"offline Omniglot copy not found at {SHARED}; shipped files are still tested")


@pytest.fixture(scope="module")
def data():
    return load_omniglot()


@pytest.fixture(scope="module")
def data_maml():
    return load_omniglot(version="maml")


# ---------------------------------------------------------------- counts and splits

def test_counts(data):
    assert data.images.shape == (1623, 20, 28, 28)
    assert data.images.dtype == np.float32
    assert len(data.alphabet_names) == 50 == len(set(data.alphabet_names))
    assert np.array_equal(np.unique(data.alphabet_idx), np.arange(50))
    assert np.array_equal(data.char_id, np.arange(1, 1624))
    assert data.background.sum() == 964
    assert np.unique(data.alphabet_idx[data.background]).size == 30
    assert np.unique(data.alphabet_idx[~data.background]).size == 20
    # alphabets are contiguous runs of char_id, numbered in order, characterNN from 1
    assert np.all(np.diff(data.alphabet_idx) >= 0)
    for a in range(50):
        n = np.count_nonzero(data.alphabet_idx == a)
        assert np.array_equal(data.char_in_alphabet[data.alphabet_idx == a], np.arange(1, n + 1))
    # every image has ink, and both versions are in [0, 1]
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert np.all(data.images.reshape(1623 * 20, -1).max(axis=1) > 0)


@pytest.mark.parametrize("scheme,sizes", [("vinyals", (1028, 172, 423)),
                                          ("maml", (1100, 100, 423))])
def test_split_sizes_disjoint_and_covering(data, scheme, sizes):
    parts = [split_characters(data, scheme, p) for p in ("train", "val", "test")]
    assert tuple(len(p) for p in parts) == sizes
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1623))


def test_vinyals_split_structure(data):
    """Vinyals et al.'s test set is the last 423 characters (char_id 1201..1623, from inside
    Gurmukhi on); val is 172 background characters made of whole alphabets."""
    test = split_characters(data, "vinyals", "test")
    assert np.array_equal(test, np.arange(1200, 1623))
    mixed = [data.alphabet_names[a] for a in range(50)
             if np.unique(data.vinyals_split[data.alphabet_idx == a]).size > 1]
    assert mixed == ["Gurmukhi"]
    val = split_characters(data, "vinyals", "val")
    assert data.background[val].all()
    for a in np.unique(data.alphabet_idx[val]):
        assert (data.vinyals_split[data.alphabet_idx == a] == 1).all()
    train = split_characters(data, "vinyals", "train")
    assert np.count_nonzero(data.background[train]) == 792


def test_maml_split_follows_finn_rule(data):
    """Recompute MAML's rule: shuffle char_id order with seed 1, 1100 train, 100 val, rest test."""
    order = list(range(1623))
    state = random.getstate()
    try:   # the global-state form used in cbfinn/maml gives the same permutation
        random.seed(1)
        random.shuffle(order)
    finally:
        random.setstate(state)
    other = list(range(1623))
    random.Random(1).shuffle(other)
    assert order == other
    assert np.array_equal(split_characters(data, "maml", "train"), np.sort(order[:1100]))
    assert np.array_equal(split_characters(data, "maml", "val"), np.sort(order[1100:1200]))
    assert np.array_equal(split_characters(data, "maml", "test"), np.sort(order[1200:]))


def test_split_bad_arguments(data):
    with pytest.raises(ValueError, match="scheme must be one of"):
        split_characters(data, "snell", "train")
    with pytest.raises(ValueError, match="part must be one of"):
        split_characters(data, "vinyals", "validation")


# ---------------------------------------------------------------- versions and dtypes

def test_versions_and_dtypes(data, data_maml):
    assert data_maml.images.shape == (1623, 20, 28, 28)
    assert set(np.unique(data_maml.images)) == {0.0, 1.0}
    # ink28 is grayscale: far more than two levels
    assert np.unique(data.images).size > 200
    # both show the same strokes: nearest-neighbour ink lies mostly on Lanczos ink
    on = data.images[data_maml.images == 1]
    assert np.median(on) > 0.5
    d64 = load_omniglot(version="ink28", dtype=np.float64)
    assert d64.images.dtype == np.float64
    assert np.array_equal(np.rint(d64.images * 255), np.rint(data.images * 255).astype(np.float64))
    with pytest.raises(ValueError, match="read-only"):
        data.images[0, 0, 0, 0] = 1.0


def test_load_bad_arguments():
    with pytest.raises(ValueError, match="version must be one of"):
        load_omniglot(version="ink105")
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        load_omniglot(dtype=np.int32)


# ---------------------------------------------------------------- integrity

def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_shipped_hashes_and_size():
    total = 0
    for fname, (size, digest) in og._SHIPPED.items():
        path = os.path.join(og.DATA_DIR, fname)
        assert os.path.getsize(path) == size
        assert sha256_file(path) == digest
        total += size
    assert total < 12 * 2**20
    for lic in ("LICENSE-omniglot-Lake.txt", "LICENSE-vinyals-split-Snell.txt"):
        with open(os.path.join(og.DATA_DIR, lic), encoding="utf-8") as f:
            assert "MIT License" in f.read()


@pytest.fixture
def copy_dir(tmp_path):
    for fname in og._SHIPPED:
        shutil.copyfile(os.path.join(og.DATA_DIR, fname), tmp_path / fname)
    return tmp_path


@pytest.mark.parametrize("fname,version", [("omniglot_ink28.npz", "ink28"),
                                           ("omniglot_ink28_maml.npz", "maml"),
                                           ("omniglot_meta.npz", "ink28")])
def test_flipped_byte_is_refused(copy_dir, fname, version):
    path = copy_dir / fname
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    expected = og._SHIPPED[fname][1]
    with pytest.raises(ValueError) as err:
        load_omniglot(copy_dir, version=version)
    msg = str(err.value)
    assert fname in msg and "corrupt" in msg
    assert f"sha256 {actual}, expected {expected}" in msg
    if fname != "omniglot_meta.npz":   # the other image file is untouched and still loads
        load_omniglot(copy_dir, version="maml" if version == "ink28" else "ink28")


@pytest.mark.parametrize("fname", ["omniglot_ink28.npz", "omniglot_meta.npz"])
def test_truncated_file_is_refused(copy_dir, fname):
    path = copy_dir / fname
    blob = path.read_bytes()[:-100]
    path.write_bytes(blob)
    with pytest.raises(ValueError) as err:
        load_omniglot(copy_dir)
    msg = str(err.value)
    assert fname in msg and "truncated" in msg
    assert f"sha256 {hashlib.sha256(blob).hexdigest()}, expected {og._SHIPPED[fname][1]}" in msg
    assert f"{len(blob)} bytes, expected {og._SHIPPED[fname][0]}" in msg


def test_missing_file_is_refused(copy_dir):
    os.remove(copy_dir / "omniglot_ink28_maml.npz")
    load_omniglot(copy_dir, version="ink28")          # not needed for this version
    with pytest.raises(FileNotFoundError, match="omniglot_ink28_maml.npz is missing"):
        load_omniglot(copy_dir, version="maml")


def _forge(folder, fname, monkeypatch, **arrays):
    """Write an npz whose hash the loader is told to expect, to reach the checks after it."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = buf.getvalue()
    (folder / fname).write_bytes(blob)
    shipped = dict(og._SHIPPED)
    shipped[fname] = (len(blob), hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(og, "_SHIPPED", shipped)


def test_wrong_shape_or_keys_refused_after_hash(copy_dir, monkeypatch):
    _forge(copy_dir, "omniglot_ink28.npz", monkeypatch,
           ink28=np.zeros((1623, 20, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r"ink28 has shape \(1623, 20, 28, 27\) dtype uint8, "
                                         r"expected shape \(1623, 20, 28, 28\)"):
        load_omniglot(copy_dir)
    _forge(copy_dir, "omniglot_ink28.npz", monkeypatch,
           ink28=np.zeros((1623, 20, 28, 28), np.float32))
    with pytest.raises(ValueError, match="dtype float32, expected shape .* dtype uint8"):
        load_omniglot(copy_dir)
    _forge(copy_dir, "omniglot_ink28.npz", monkeypatch, pixels=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"has keys \['pixels'\], expected \['ink28'\]"):
        load_omniglot(copy_dir)


def test_pickled_array_is_never_unpickled(copy_dir, monkeypatch):
    _forge(copy_dir, "omniglot_ink28.npz", monkeypatch, ink28=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_omniglot(copy_dir)


def test_bad_meta_values_refused(copy_dir, monkeypatch):
    with np.load(os.path.join(og.DATA_DIR, "omniglot_meta.npz"), allow_pickle=False) as z:
        meta = {k: z[k] for k in z.files}
    meta["maml_split"] = meta["maml_split"].copy()
    meta["maml_split"][7] = 3
    _forge(copy_dir, "omniglot_meta.npz", monkeypatch, **meta)
    with pytest.raises(ValueError, match="maml_split has values outside 0/1/2"):
        load_omniglot(copy_dir)


# ---------------------------------------------------------------- against the offline copy

@needs_shared
def test_pixels_and_labels_equal_shared_arrays(data, data_maml):
    bg = np.load(os.path.join(SHARED, "omniglot_background.npz"), allow_pickle=False)
    ev = np.load(os.path.join(SHARED, "omniglot_evaluation.npz"), allow_pickle=False)
    runs = np.load(os.path.join(SHARED, "lake_oneshot_runs.npz"), allow_pickle=False)
    ink28 = np.concatenate([bg["ink28"], ev["ink28"]])
    maml = np.concatenate([bg["ink28_maml"], ev["ink28_maml"]])
    assert np.array_equal(np.rint(data.images * 255).astype(np.uint8), ink28)
    assert np.array_equal(data_maml.images, maml.astype(np.float32))
    assert np.array_equal(data.char_id, np.concatenate([bg["char_id"], ev["char_id"]]))
    names = [str(s) for s in bg["alphabet_names"]] + [str(s) for s in ev["alphabet_names"]]
    assert list(data.alphabet_names) == names
    assert [names[i] for i in data.alphabet_idx] == \
        [str(bg["alphabet_names"][i]) for i in bg["alphabet_idx"]] + \
        [str(ev["alphabet_names"][i]) for i in ev["alphabet_idx"]]
    assert np.array_equal(data.vinyals_split,
                          np.concatenate([bg["vinyals_split"], ev["vinyals_split"]]))
    assert np.array_equal(data.lake_train_char + 1, runs["train_char_id"])
    assert np.array_equal(data.lake_train_drawing + 1, runs["train_drawing"])
    assert np.array_equal(data.lake_test_char + 1, runs["test_char_id"])
    assert np.array_equal(data.lake_test_drawing + 1, runs["test_drawing"])
    assert np.array_equal(data.lake_test_label, runs["test_label"])
    assert [names[i] for i in data.lake_run_alphabet] == [str(s) for s in runs["run_alphabet"]]


@needs_shared
def test_build_is_reproducible(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "build_omniglot", os.path.join(ROOT, "scripts", "build_omniglot.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.main([SHARED, "--out", str(tmp_path)]) == 0
    assert "matches _SHIPPED" in capsys.readouterr().out
    for fname in list(og._SHIPPED) + ["LICENSE-omniglot-Lake.txt",
                                      "LICENSE-vinyals-split-Snell.txt"]:
        assert sha256_file(tmp_path / fname) == sha256_file(os.path.join(og.DATA_DIR, fname))


# ---------------------------------------------------------------- episode sampler

def rot_ccw(img, r):
    """r counter-clockwise quarter turns, written out without np.rot90: out[i, j] = in[j, W-1-i]."""
    for _ in range(r):
        n = img.shape[0]
        img = np.array([[img[j, n - 1 - i] for j in range(n)] for i in range(n)])
    return img


def check_episode(ep, images, chars, T, N, K, Q, dtype, n_rot, grouped=True):
    """Shapes, labels, distinct classes and drawings, and every row's pixels. grouped: rows
    are in label order (the sampler); Lake's query rows are in the benchmark's order."""
    H = images.shape[2]
    assert ep.support_x.shape == (T, N * K, H, H, 1) and ep.support_x.dtype == dtype
    assert ep.query_x.shape == (T, N * Q, H, H, 1) and ep.query_x.dtype == dtype
    assert ep.support_y.dtype == np.int64 and ep.query_y.dtype == np.int64
    assert np.array_equal(ep.support_y, np.tile(np.repeat(np.arange(N), K), (T, 1)))
    want_qy = np.tile(np.repeat(np.arange(N), Q), (T, 1))
    assert np.array_equal(ep.query_y if grouped else np.sort(ep.query_y, axis=1), want_qy)
    assert np.isin(ep.char, chars).all()
    assert ep.rotation.min() >= 0 and ep.rotation.max() < n_rot
    for t in range(T):
        pairs = set(zip(ep.char[t].tolist(), ep.rotation[t].tolist()))
        assert len(pairs) == N                                      # distinct classes
        for n in range(N):
            s = ep.support_drawing[t][ep.support_y[t] == n]
            q = ep.query_drawing[t][ep.query_y[t] == n]
            both = np.concatenate([s, q])
            assert np.unique(both).size == K + Q                     # distinct drawings
            assert both.min() >= 0 and both.max() < images.shape[1]
        for x, y, draw in ((ep.support_x[t], ep.support_y[t], ep.support_drawing[t]),
                           (ep.query_x[t], ep.query_y[t], ep.query_drawing[t])):
            for i in range(len(y)):
                c, r = ep.char[t, y[i]], ep.rotation[t, y[i]]
                want = np.rot90(images[c, draw[i]], r).astype(dtype)
                assert np.array_equal(x[i, :, :, 0], want)


@pytest.mark.parametrize("N,K,Q,T,rotate,dtype", [
    (5, 1, 15, 3, True, np.float32),
    (20, 5, 5, 2, True, np.float64),
    (7, 3, 2, 1, False, np.float32),
    (1, 1, 0, 4, True, np.float32),
    (3, 13, 7, 2, True, np.float64),          # K + Q = 20: every drawing used
])
def test_sampler_invariants(data, N, K, Q, T, rotate, dtype):
    chars = split_characters(data, "vinyals", "val")
    sampler = EpisodeSampler(data.images, chars, N, K, Q, rotate=rotate, seed=11, dtype=dtype)
    ep = sampler.sample(T)
    check_episode(ep, data.images, chars, T, N, K, Q, np.dtype(dtype), 4 if rotate else 1)
    if not rotate:
        assert not ep.rotation.any()


def test_sampler_reproducible(data):
    chars = split_characters(data, "maml", "train")
    a = EpisodeSampler(data.images, chars, 5, 1, 3, seed=2024)
    b = EpisodeSampler(data.images, chars, 5, 1, 3, seed=2024)
    c = EpisodeSampler(data.images, chars, 5, 1, 3, seed=2025)
    for _ in range(3):
        ea, eb, ec = a.sample(4), b.sample(4), c.sample(4)
        for f in ("support_x", "support_y", "query_x", "query_y", "char", "rotation",
                  "support_drawing", "query_drawing"):
            assert np.array_equal(getattr(ea, f), getattr(eb, f))
        assert not np.array_equal(ea.char, ec.char)
    # successive calls move on
    assert not np.array_equal(a.sample(4).char, a.sample(4).char)


def test_sampler_whole_pool(data):
    """n_way equal to the pool: every (character, rotation) appears once per task."""
    chars = np.array([4, 1000, 1622])
    ep = EpisodeSampler(data.images, chars, 12, 2, 1, seed=5).sample(3)
    for t in range(3):
        pairs = sorted(zip(ep.char[t].tolist(), ep.rotation[t].tolist()))
        assert pairs == [(c, r) for c in chars.tolist() for r in range(4)]
    check_episode(ep, data.images, chars, 3, 12, 2, 1, np.dtype(np.float32), 4)


def test_rotation_direction(data):
    """A class turned r times shows rot_ccw(original, r), checked without np.rot90."""
    chars = np.arange(50)
    ep = EpisodeSampler(data.images, chars, 40, 1, 1, seed=3).sample(2)
    seen = set()
    for t in range(2):
        for i in range(40):
            c, r = ep.char[t, i], ep.rotation[t, i]
            orig = data.images[c, ep.support_drawing[t, i]]
            assert np.array_equal(ep.support_x[t, i, :, :, 0], rot_ccw(orig, r))
            if r:
                assert not np.array_equal(ep.support_x[t, i, :, :, 0], orig)
            seen.add(int(r))
    assert seen == {0, 1, 2, 3}


def test_sampler_accepts_list_and_works_on_maml_images(data_maml):
    ep = EpisodeSampler(data_maml.images, [0, 2, 4], 2, 1, 1, seed=0, rotate=False).sample(1)
    assert set(np.unique(ep.support_x)) <= {0.0, 1.0}
    check_episode(ep, data_maml.images, [0, 2, 4], 1, 2, 1, 1, np.dtype(np.float32), 1)


def test_sampler_bad_arguments(data):
    im = data.images
    chars = np.arange(10)
    with pytest.raises(ValueError, match=r"n_way = 41 exceeds the class pool of 40 "
                                         r"\(10 characters x 4 rotation"):
        EpisodeSampler(im, chars, 41, 1, 1, seed=0)
    with pytest.raises(ValueError, match="n_way = 11 exceeds the class pool of 10"):
        EpisodeSampler(im, chars, 11, 1, 1, seed=0, rotate=False)
    with pytest.raises(ValueError, match="k_shot \\+ q_query = 21 exceeds the 20 drawings"):
        EpisodeSampler(im, chars, 5, 5, 16, seed=0)
    with pytest.raises(ValueError, match="k_shot must be >= 1, got 0"):
        EpisodeSampler(im, chars, 5, 0, 1, seed=0)
    with pytest.raises(ValueError, match="n_way must be >= 1, got 0"):
        EpisodeSampler(im, chars, 0, 1, 1, seed=0)
    with pytest.raises(ValueError, match="q_query must be >= 0, got -1"):
        EpisodeSampler(im, chars, 5, 1, -1, seed=0)
    with pytest.raises(TypeError, match="n_way must be an int, got float 5.0"):
        EpisodeSampler(im, chars, 5.0, 1, 1, seed=0)
    with pytest.raises(TypeError, match="k_shot must be an int, got bool"):
        EpisodeSampler(im, chars, 5, True, 1, seed=0)
    with pytest.raises(TypeError, match="seed must be an int, got NoneType"):
        EpisodeSampler(im, chars, 5, 1, 1, seed=None)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'seed'"):
        EpisodeSampler(im, chars, 5, 1, 1)
    with pytest.raises(ValueError, match="char_indices has repeated characters"):
        EpisodeSampler(im, np.array([1, 2, 2]), 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"char_indices must lie in \[0, 1623\), got values 0..1623"):
        EpisodeSampler(im, np.array([0, 1623]), 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"char_indices must lie in \[0, 1623\), got values -1..3"):
        EpisodeSampler(im, np.array([-1, 3]), 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"non-empty 1-D array, got shape \(0,\)"):
        EpisodeSampler(im, np.array([], dtype=np.int64), 2, 1, 1, seed=0)
    with pytest.raises(TypeError, match="char_indices must have an integer dtype, got float64"):
        EpisodeSampler(im, np.array([1.0, 2.0]), 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"images must have 4 dimensions, got shape \(1623, 20, 784\)"):
        EpisodeSampler(im.reshape(1623, 20, 784), chars, 2, 1, 1, seed=0)
    with pytest.raises(TypeError, match="images must be float32 or float64, got dtype uint8"):
        EpisodeSampler(np.zeros((3, 20, 28, 28), np.uint8), [0, 1], 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"rotate=True needs square images, got \(28, 27\)"):
        EpisodeSampler(np.zeros((3, 20, 28, 27), np.float32), [0, 1], 2, 1, 1, seed=0)
    with pytest.raises(TypeError, match="rotate must be a bool, got int"):
        EpisodeSampler(im, chars, 2, 1, 1, seed=0, rotate=1)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got float16"):
        EpisodeSampler(im, chars, 2, 1, 1, seed=0, dtype=np.float16)
    sampler = EpisodeSampler(im, chars, 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match="n_tasks must be >= 1, got 0"):
        sampler.sample(0)


# ---------------------------------------------------------------- Lake's runs

def test_lake_runs_consistent(data):
    R, J = data.lake_train_char.shape
    assert (R, J) == (20, 20)
    runs_per_alphabet = np.bincount(data.lake_run_alphabet, minlength=50)
    assert np.count_nonzero(runs_per_alphabet) == 10 and runs_per_alphabet.max() == 2
    for r in range(R):
        train, test, label = data.lake_train_char[r], data.lake_test_char[r], data.lake_test_label[r]
        assert np.unique(train).size == J                      # 20 distinct classes
        assert np.array_equal(np.sort(label), np.arange(J))    # each class tested once
        assert np.array_equal(train[label], test)              # label points to the same character
        assert (data.alphabet_idx[train] == data.lake_run_alphabet[r]).all()
        assert not data.background[train].any()                # evaluation set only
        # a test drawing is never the training drawing of its class
        assert (data.lake_train_drawing[r][label] != data.lake_test_drawing[r]).all()


def test_lake_episodes_and_run(data):
    ep = lake_episodes(data)
    assert ep.support_x.shape == (20, 20, 28, 28, 1) == ep.query_x.shape
    assert ep.support_x.dtype == np.float32
    assert np.array_equal(ep.support_y, np.tile(np.arange(20), (20, 1)))
    check_lake = lambda x, c, d: np.array_equal(x[..., 0], data.images[c, d])
    assert check_lake(ep.support_x, data.lake_train_char, data.lake_train_drawing)
    assert check_lake(ep.query_x, data.lake_test_char, data.lake_test_drawing)
    # each test item's labelled class is the same character, so the Episode invariants hold
    check_episode(ep, data.images, np.arange(1623), 20, 20, 1, 1, np.dtype(np.float32), 1,
                  grouped=False)
    for r in (0, 7, 19):
        train_x, test_x, test_y = lake_run(data, r, dtype=np.float64)
        assert train_x.dtype == np.float64 and test_y.dtype == np.int64
        assert np.array_equal(train_x, ep.support_x[r].astype(np.float64))
        assert np.array_equal(test_x, ep.query_x[r].astype(np.float64))
        assert np.array_equal(test_y, data.lake_test_label[r])
    with pytest.raises(ValueError, match="run must be in 0..19, got 20"):
        lake_run(data, 20)
    with pytest.raises(ValueError, match="run must be >= 0, got -1"):
        lake_run(data, -1)
