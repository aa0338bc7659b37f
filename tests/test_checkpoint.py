"""Tests for metacore.checkpoint: round trips, refusal of corrupt / truncated / foreign files,
atomic writes under simulated failures and a real killed writer, RNG state, bad input, and an
optimizer + RNG resume through a checkpoint that continues bit-identically."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import metacore.checkpoint as ckpt
from metacore.checkpoint import (CheckpointError, load_checkpoint, rng_from_state, rng_state,
                                 save_checkpoint, set_rng_state)
from metacore.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "params": rng.standard_normal(13),                             # float64 (13,)
        "w32": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "labels": rng.integers(-5, 5, size=(2, 11)).astype(np.int64),
        "bytes": rng.integers(0, 256, size=17).astype(np.uint8),
        "step": np.array(7, dtype=np.int32),                          # 0-d
        "scale": np.array(0.25),                                       # 0-d float64
        "empty": np.zeros((0, 4), dtype=np.float32),                   # empty
        "empty1d": np.zeros(0),
        "mask": rng.random(9) > 0.5,
        "cplx": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "big_endian": np.arange(5, dtype=">f8"),
        "fortran": np.asfortranarray(rng.standard_normal((4, 3))),
        "strided": rng.standard_normal(20)[::3],                       # non-contiguous view
        "names": np.array(["omniglot", "mini"]),
        "file": np.array([1.0]),            # would clash with np.savez's own keyword
    }


META = {"algo": "maml", "lr": 0.001, "tiny": 5e-324, "third": 1 / 3, "step": 1234,
        "big": 2 ** 100, "neg": -3, "flag": True, "none": None, "unicode": "Ω-net",
        "shape": [5, 5, 1], "nested": {"betas": [0.9, 0.999], "empty": {}, "list": []}}


def _assert_same_arrays(got, want):
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        g = got[name]
        assert isinstance(g, np.ndarray), name
        assert g.dtype == arr.dtype and g.shape == arr.shape, (name, g.dtype, g.shape)
        # bitwise: views on bytes, so -0.0 vs 0.0 or NaN payloads would also count
        assert np.ascontiguousarray(g).tobytes() == np.ascontiguousarray(arr).tobytes(), name


def _save(tmp_path, name="run.npz", arrays=None, meta=None):
    path = tmp_path / name
    save_checkpoint(path, _arrays() if arrays is None else arrays,
                    META if meta is None else meta)
    return path


# --- round trips -------------------------------------------------------------------------------

def test_round_trip_arrays_and_meta(tmp_path):
    arrays = _arrays()
    path = _save(tmp_path)
    got, meta = load_checkpoint(path)
    _assert_same_arrays(got, arrays)
    assert meta == META
    assert type(meta["step"]) is int and type(meta["lr"]) is float
    assert meta["tiny"] == 5e-324 and meta["third"] == 1 / 3 and meta["big"] == 2 ** 100
    for arr in got.values():                  # fresh, writeable arrays the caller may modify
        assert arr.flags.writeable


def test_round_trip_str_path_empty_arrays_and_overwrite(tmp_path):
    path = str(tmp_path / "meta_only.ckpt")   # no .npz suffix: the name is used as given
    save_checkpoint(path, {}, {})
    assert os.listdir(tmp_path) == ["meta_only.ckpt"]
    assert load_checkpoint(path) == ({}, {})
    save_checkpoint(path, {"x": np.ones(3)}, {"v": 2})
    got, meta = load_checkpoint(path)
    _assert_same_arrays(got, {"x": np.ones(3)})
    assert meta == {"v": 2}
    assert os.listdir(tmp_path) == ["meta_only.ckpt"]


def test_file_is_a_plain_npz_without_pickle(tmp_path):
    path = _save(tmp_path)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(list(_arrays()) + ["__header__", "__sha256__"])
        header = json.loads(npz["__header__"].tobytes().decode("utf-8"))
    assert header["format"] == "metacore-checkpoint" and header["version"] == 1
    assert header["meta"] == META and header["arrays"] == sorted(_arrays())


# --- refusing bad files ------------------------------------------------------------------------

def test_every_single_byte_flip_is_refused_or_harmless(tmp_path):
    """Flip each byte of a small checkpoint in turn: loading must either raise CheckpointError
    naming the file, or return exactly the saved content (bytes the zip format does not read,
    e.g. timestamps). Flips inside array data and the header must all be refused."""
    arrays = {"params": np.linspace(-1, 1, 7), "step": np.array(3, np.int64)}
    meta = {"lr": 0.5, "name": "x"}
    path = _save(tmp_path, arrays=arrays, meta=meta)
    raw = path.read_bytes()
    data_at = raw.index(arrays["params"].tobytes())
    header_at = raw.index(b'"format"')
    must_refuse = set(range(data_at, data_at + 56)) | set(range(header_at, header_at + 10))
    bad = tmp_path / "bad.npz"
    refused = 0
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x41
        bad.write_bytes(bytes(flipped))
        try:
            got, got_meta = load_checkpoint(bad)
        except CheckpointError as e:
            assert str(bad) in str(e)
            refused += 1
            continue
        assert i not in must_refuse, f"flip at byte {i} inside data/header was accepted"
        _assert_same_arrays(got, arrays)
        assert got_meta == meta
    assert refused > len(raw) // 2           # most of the file is checked content


def test_digest_catches_damage_the_zip_crc_misses(tmp_path):
    """Rewrite a member with different values but a correct CRC (a consistent edit):
    only the SHA-256 can tell."""
    path = _save(tmp_path, arrays={"a": np.arange(4.0), "b": np.ones(2)}, meta={})
    with np.load(path, allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    members["a"] = members["a"] + 1.0
    with open(path, "wb") as f:
        ckpt._write_npz(f, members)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(path)
    del members["a"]                          # a member dropped altogether
    with open(path, "wb") as f:
        ckpt._write_npz(f, members)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path)
    raw = path.read_bytes()
    short = tmp_path / "short.npz"
    for n in sorted({0, 1, 4, 5, 30, 100, len(raw) // 2, len(raw) - 23, len(raw) - 22,
                     len(raw) - 1} | set(range(0, len(raw), 97))):
        short.write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match=rf"{short.name}: .*(truncated|not a metacore)"):
            load_checkpoint(short)


def test_other_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes.txt: not a metacore checkpoint \(not an"):
        load_checkpoint(text)
    npy = tmp_path / "x.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(CheckpointError, match="x.npy: not a metacore checkpoint"):
        load_checkpoint(npy)
    npz = tmp_path / "plain.npz"
    np.savez(npz, a=np.arange(3))
    with pytest.raises(CheckpointError, match="plain.npz: not a metacore checkpoint .an .npz "
                                              "without its header"):
        load_checkpoint(npz)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("__header__.npy", b"not npy")
        zf.writestr("__sha256__.npy", b"not npy")
    with pytest.raises(CheckpointError, match="other.zip: member '__header__' is not an .npy"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.npz")


def _forge(path, header_dict, arrays):
    """A file with a self-consistent digest but a header of our choosing."""
    header = json.dumps(header_dict).encode("utf-8")
    members = dict(arrays)
    members["__header__"] = np.frombuffer(header, dtype=np.uint8)
    members["__sha256__"] = ckpt._digest(header, arrays)
    with open(path, "wb") as f:
        ckpt._write_npz(f, members)


def test_foreign_format_version_and_array_list_are_refused(tmp_path):
    path = tmp_path / "forged.npz"
    a = {"a": np.ones(2)}
    _forge(path, {"format": "someone-else", "version": 1, "arrays": ["a"], "meta": {}}, a)
    with pytest.raises(CheckpointError, match="not a metacore checkpoint .format 'someone-else'"):
        load_checkpoint(path)
    _forge(path, {"format": "metacore-checkpoint", "version": 2, "arrays": ["a"], "meta": {}}, a)
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 2"):
        load_checkpoint(path)
    _forge(path, {"format": "metacore-checkpoint", "version": 1, "arrays": ["b"], "meta": {}}, a)
    with pytest.raises(CheckpointError, match=r"array list \['b'\] does not match"):
        load_checkpoint(path)
    _forge(path, {"format": "metacore-checkpoint", "version": 1, "arrays": ["a"], "meta": {}}, a)
    assert load_checkpoint(path)[1] == {}     # the forger itself is right


# --- atomic writes -----------------------------------------------------------------------------

def _fail(*args, **kwargs):
    raise OSError("simulated failure")


@pytest.mark.parametrize("where", ["os.replace", "os.fsync", "write_array"])
def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch, where):
    path = _save(tmp_path, meta={"generation": 1})
    before = path.read_bytes()
    if where == "write_array":
        real = np.lib.format.write_array
        calls = []

        def write_some_then_fail(fp, array, **kwargs):   # dies after 3 members are written
            calls.append(1)
            if len(calls) > 3:
                raise OSError("simulated failure")
            return real(fp, array, **kwargs)
        monkeypatch.setattr(np.lib.format, "write_array", write_some_then_fail)
    else:
        monkeypatch.setattr(os, where.split(".")[1], _fail)
    new = {k: np.asarray(v * 2) if v.dtype.kind in "fc" else v for k, v in _arrays().items()}
    with pytest.raises(OSError, match="simulated failure"):
        save_checkpoint(path, new, {"generation": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [path.name]            # no stray temporary file
    assert path.read_bytes() == before
    got, meta = load_checkpoint(path)
    _assert_same_arrays(got, _arrays())
    assert meta == {"generation": 1}


def test_killed_writer_never_leaves_partial_file_under_final_name(tmp_path):
    """A writer process that dies (os._exit, no cleanup) halfway through: the target still holds
    the previous checkpoint; only the hidden temporary file is left over."""
    path = _save(tmp_path, meta={"generation": 1})
    script = f"""
import os, sys
sys.path.insert(0, {REPO!r})
import numpy as np
from metacore.checkpoint import save_checkpoint
real = np.lib.format.write_array
n = [0]
def dying(fp, array, **kw):
    n[0] += 1
    if n[0] == 3:
        os._exit(17)
    return real(fp, array, **kw)
np.lib.format.write_array = dying
save_checkpoint({str(path)!r}, {{"a": np.ones(1000), "b": np.ones(1000), "c": np.ones(9)}},
                {{"generation": 2}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    left = sorted(os.listdir(tmp_path))
    assert path.name in left and len(left) == 2
    stray = [n for n in left if n != path.name][0]
    assert stray.startswith("." + path.name + ".") and stray.endswith(".tmp")
    got, meta = load_checkpoint(path)
    _assert_same_arrays(got, _arrays())
    assert meta == {"generation": 1}


# --- RNG state ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM"])
def test_rng_state_round_trip_through_checkpoint(tmp_path, bit_generator):
    rng = np.random.Generator(getattr(np.random, bit_generator)(20240601))
    rng.standard_normal(5)
    rng.integers(0, 10, size=3, dtype=np.uint32)  # leaves a buffered 32-bit half behind
    state = rng_state(rng)
    assert state["has_uint32"] == 1 and state["bit_generator"] == bit_generator
    save_checkpoint(tmp_path / "r.npz", {}, {"rng": state})
    _, meta = load_checkpoint(tmp_path / "r.npz")
    assert meta["rng"] == state

    def draws(g):
        return [g.integers(0, 1000, size=4, dtype=np.uint32), g.standard_normal(7),
                g.random(3, dtype=np.float32), g.permutation(11), g.integers(0, 2 ** 62, 2)]

    want = draws(rng)
    restored = rng_from_state(meta["rng"])
    other = np.random.Generator(getattr(np.random, bit_generator)(1))
    set_rng_state(other, meta["rng"])
    for got in (draws(restored), draws(other)):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_rng_state_bad_input():
    with pytest.raises(TypeError, match="rng_state: expected a numpy.random.Generator, got "
                                        "RandomState"):
        rng_state(np.random.RandomState(0))
    with pytest.raises(TypeError, match="rng_state: only .* supported, got MT19937"):
        rng_state(np.random.Generator(np.random.MT19937(0)))
    good = rng_state(np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng_from_state: state keys"):
        rng_from_state({k: v for k, v in good.items() if k != "inc"})
    with pytest.raises(ValueError, match="rng_from_state: bit_generator must be one of"):
        rng_from_state({**good, "bit_generator": "MT19937"})
    with pytest.raises(ValueError, match=r"rng_from_state: state must be an int in \[0, "
                                         r"340282366920938463463374607431768211456\), got"):
        rng_from_state({**good, "state": 2 ** 128})
    with pytest.raises(ValueError, match="rng_from_state: uinteger must be an int"):
        rng_from_state({**good, "uinteger": 1.5})
    with pytest.raises(ValueError, match="rng_from_state: inc must be odd"):
        rng_from_state({**good, "inc": good["inc"] - 1})
    with pytest.raises(TypeError, match="rng_from_state: state must be a dict"):
        rng_from_state([1, 2])
    with pytest.raises(ValueError, match="set_rng_state: the state is for PCG64, the Generator "
                                         "uses PCG64DXSM"):
        set_rng_state(np.random.Generator(np.random.PCG64DXSM(0)), good)


# --- bad input to save -------------------------------------------------------------------------

@pytest.mark.parametrize("arrays,exc,message", [
    ({"o": np.array([1, "a"], dtype=object)}, TypeError, r"arrays\['o'\] has dtype object"),
    ({"s": np.zeros(2, dtype=[("x", "f8")])}, TypeError, r"arrays\['s'\] has dtype"),
    ({"d": np.array(["2024-01-01"], dtype="M8[D]")}, TypeError, r"arrays\['d'\] has dtype"),
    ({"__header__": np.ones(1)}, ValueError, "'__header__' is reserved"),
    ({"a/b": np.ones(1)}, ValueError, "'a/b' may not contain"),
    ({"a\nb": np.ones(1)}, ValueError, "may not contain"),
    ({"": np.ones(1)}, TypeError, "names must be non-empty str"),
    ({3: np.ones(1)}, TypeError, "names must be non-empty str, got 3"),
    ({"x": [1.0, 2.0]}, TypeError, r"arrays\['x'\] must be a numpy.ndarray, got list"),
    ({"x": np.float64(1.0)}, TypeError, r"arrays\['x'\] must be a numpy.ndarray, got float64"),
    ([("x", np.ones(1))], TypeError, "arrays must be a dict"),
])
def test_save_rejects_bad_arrays(tmp_path, arrays, exc, message):
    with pytest.raises(exc, match=f"save_checkpoint: .*{message}"):
        save_checkpoint(tmp_path / "c.npz", arrays, {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("meta,exc,message", [
    ({"shape": (5, 5)}, TypeError, r"meta\['shape'\] has type tuple.*use a list"),
    ({"n": np.int64(3)}, TypeError, r"meta\['n'\] has type int64.*\.item\(\)"),
    ({"w": np.ones(2)}, TypeError, r"meta\['w'\] has type ndarray"),
    ({"loss": float("nan")}, ValueError, r"meta\['loss'\] is nan, which is not valid JSON"),
    ({"a": [1, {"b": float("inf")}]}, ValueError, r"meta\['a'\]\[1\]\['b'\] is inf"),
    ({"d": {1: "x"}}, TypeError, r"meta\['d'\] has key 1 of type int"),
    ({"s": {1, 2}}, TypeError, r"meta\['s'\] has type set"),
    ([1, 2], TypeError, "meta must be a dict, got list"),
])
def test_save_rejects_bad_meta(tmp_path, meta, exc, message):
    with pytest.raises(exc, match=f"save_checkpoint: {message}"):
        save_checkpoint(tmp_path / "c.npz", {"x": np.ones(1)}, meta)
    assert os.listdir(tmp_path) == []


def test_save_and_load_reject_bad_paths(tmp_path):
    with pytest.raises(TypeError, match="save_checkpoint: path must be a str or os.PathLike, "
                                        "got int"):
        save_checkpoint(3, {}, {})
    with pytest.raises(ValueError, match="save_checkpoint: path is empty"):
        save_checkpoint("", {}, {})
    with pytest.raises(ValueError, match="save_checkpoint: .* is a directory"):
        save_checkpoint(tmp_path, {}, {})
    with pytest.raises(TypeError, match="load_checkpoint: path must be a str or os.PathLike"):
        load_checkpoint(None)


# --- resume through a checkpoint ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "nesterov", "adagrad", "adam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_and_rng_resume_bit_identical(tmp_path, name, dtype):
    """Train on noisy gradients drawn from an RNG; checkpoint params + optimizer + RNG midway;
    a run resumed from the file matches the uninterrupted run bit for bit."""
    size = 29
    target = np.linspace(-2, 2, size).astype(dtype)

    def run(params, opt, rng, steps):
        for _ in range(steps):
            noise = rng.standard_normal(size).astype(dtype)
            opt.step(params, (params - target) + dtype(0.1) * noise)

    rng = np.random.default_rng(5)
    params = np.zeros(size, dtype)
    opt = make_optimizer(name, size, dtype, lr=0.05)
    run(params, opt, rng, 7)
    state = opt.state_dict()
    arrays = {"params": params, **{f"opt.{k}": v for k, v in state.items()
                                   if isinstance(v, np.ndarray)}}
    meta = {"optimizer": name, "dtype": np.dtype(dtype).name, "rng": rng_state(rng),
            "opt": {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}}
    save_checkpoint(tmp_path / "ckpt.npz", arrays, meta)
    run(params, opt, rng, 9)

    got, meta = load_checkpoint(tmp_path / "ckpt.npz")
    params2 = got["params"]
    opt2 = make_optimizer(meta["optimizer"], size, np.dtype(meta["dtype"]), lr=0.9)
    opt2.load_state_dict({**meta["opt"], **{k[4:]: v for k, v in got.items()
                                            if k.startswith("opt.")}})
    run(params2, opt2, rng_from_state(meta["rng"]), 9)
    assert params2.dtype == params.dtype
    assert params2.tobytes() == params.tobytes()
