"""Checkpoints: named arrays plus JSON metadata in one .npz file, checksummed, written atomically.

    save_checkpoint(path, arrays, meta)      arrays: dict str -> ndarray, meta: JSON-able dict
    load_checkpoint(path) -> (arrays, meta)
    rng_state(rng) -> dict                   a PCG64 Generator's state as plain ints (for meta)
    rng_from_state(state) -> Generator       a new Generator that continues the same stream
    set_rng_state(rng, state)                restore into an existing Generator

File format (a standard .npz, readable by np.load(path, allow_pickle=False)):
    <name>.npy        one member per array, written with allow_pickle=False
    __header__.npy    uint8 (B,): UTF-8 JSON {"format": "metacore-checkpoint", "version": 1,
                      "arrays": [sorted names], "meta": meta}
    __sha256__.npy    uint8 (32,): SHA-256 over the header bytes and, per array in name order,
                      its name, dtype, shape and C-order bytes; every field is length-prefixed
                      so no two different contents hash the same stream.
The zip CRCs catch most damage already; the digest also covers what they do not (a member
dropped from the central directory, a header edited together with its CRC) and ties the
arrays to the metadata they were saved with.

Atomic write: the file is written to a fresh temporary name in the target's directory,
flushed and fsync'ed, then os.replace'd onto the target and the directory fsync'ed. A crash
or an error at any point leaves either the old checkpoint or the new one under the final name,
never a partial file; on an error the temporary file is removed.

Shape letters: B header length in bytes.
"""
import hashlib
import json
import math
import numbers
import os
import secrets
import zipfile

import numpy as np

from metacore.errors import UserError

FORMAT = "metacore-checkpoint"
VERSION = 1
_HEADER = "__header__"
_DIGEST = "__sha256__"
# bool, signed/unsigned int, float, complex, fixed-width bytes and unicode: all stored without
# pickle. Object, structured (void) and datetime arrays are refused.
_ALLOWED_KINDS = "biufcSU"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(UserError):
    """A file that is not a valid metacore checkpoint (corrupt, truncated, or something else).
    A ValueError (through metacore.errors.UserError): the CLI prints it as one line."""


# --- input checks ------------------------------------------------------------------------------

def _check_path(op, path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{op}: path is empty")
    return path


def _check_arrays(arrays):
    op = "save_checkpoint"
    if not isinstance(arrays, dict):
        raise TypeError(f"{op}: arrays must be a dict of name -> numpy.ndarray, "
                        f"got {type(arrays).__name__}")
    for name, arr in arrays.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{op}: array names must be non-empty str, got {name!r}")
        if name.startswith("__"):
            raise ValueError(f"{op}: array name {name!r} is reserved (names may not start "
                             f"with '__')")
        if any(ch in name for ch in "/\\") or not name.isprintable():
            raise ValueError(f"{op}: array name {name!r} may not contain '/', '\\' or "
                             f"non-printable characters")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{op}: arrays[{name!r}] must be a numpy.ndarray, "
                            f"got {type(arr).__name__}")
        if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.hasobject:
            raise TypeError(f"{op}: arrays[{name!r}] has dtype {arr.dtype}, which cannot be "
                            f"stored without pickle (object, structured and datetime arrays "
                            f"are refused)")


def _check_json(where, value):
    """Only what JSON round-trips exactly: dict with str keys, list, str, bool, None, int, and
    finite float. (Tuples would come back as lists, int keys as str, NaN is not JSON.)"""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"save_checkpoint: {where} is {value}, which is not valid JSON; "
                             f"store it as None or a string")
        return
    if type(value) is int:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(f"{where}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"save_checkpoint: {where} has key {key!r} of type "
                                f"{type(key).__name__}; JSON keys must be str")
            _check_json(f"{where}[{key!r}]", item)
        return
    hint = ""
    if isinstance(value, (np.generic, np.ndarray)):
        hint = " (convert NumPy values with .item() / .tolist(), or store arrays in `arrays`)"
    elif isinstance(value, tuple):
        hint = " (use a list: a tuple would load back as a list)"
    raise TypeError(f"save_checkpoint: {where} has type {type(value).__name__}, "
                    f"which does not round-trip through JSON{hint}")


# --- content digest ----------------------------------------------------------------------------

def _digest(header, arrays):
    """SHA-256 over the header bytes and each array's name, dtype, shape and C-order bytes, in
    name order, each field length-prefixed. Returns uint8 (32,)."""
    h = hashlib.sha256()

    def feed(b):
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    feed(header)
    for name in sorted(arrays):
        arr = arrays[name]
        feed(name.encode("utf-8"))
        feed(arr.dtype.str.encode("ascii"))
        feed(json.dumps(list(arr.shape)).encode("ascii"))
        feed(np.ascontiguousarray(arr).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


# --- save --------------------------------------------------------------------------------------

def _write_npz(f, members):
    """An uncompressed .npz, as np.savez writes it, but through zipfile directly so that any
    array name is allowed (np.savez takes names as keywords, so 'file' would clash) and pickle
    is refused by the writer itself."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in members.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def _fsync_dir(directory):
    """Make the rename itself durable. Not every platform can open a directory (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, arrays, meta):
    """Write `arrays` (dict name -> ndarray) and `meta` (a JSON-able dict) to `path` atomically.

    Array names: non-empty str, not starting with '__', without '/' or '\\'. Arrays of any
    shape (0-d and empty included) and of bool/int/uint/float/complex/bytes/str dtype; object,
    structured and datetime arrays are refused, so nothing is ever pickled. meta may hold only
    dict (str keys), list, str, bool, None, int and finite float, which JSON returns exactly.
    The file at `path` is replaced only once the new one is completely on disk; on an error the
    old file (if any) is untouched and no temporary file is left behind.
    """
    op = "save_checkpoint"
    path = _check_path(op, path)
    _check_arrays(arrays)
    if not isinstance(meta, dict):
        raise TypeError(f"{op}: meta must be a dict, got {type(meta).__name__}")
    _check_json("meta", meta)
    if os.path.isdir(path):
        raise ValueError(f"{op}: {path} is a directory")

    header = json.dumps({"format": FORMAT, "version": VERSION, "arrays": sorted(arrays),
                         "meta": meta}, sort_keys=True, allow_nan=False).encode("utf-8")
    members = {name: arrays[name] for name in sorted(arrays)}
    members[_HEADER] = np.frombuffer(header, dtype=np.uint8)          # (B,)
    members[_DIGEST] = _digest(header, arrays)                         # (32,)

    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # O_EXCL: never clobber another writer's file; 0o666 & umask like a normal file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


# --- load --------------------------------------------------------------------------------------

def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint. Returns (arrays, meta): a dict of fresh
    ndarrays by name and the meta dict. Never unpickles. Raises CheckpointError (a ValueError)
    naming the file if it is not a metacore checkpoint, is truncated, or its content does not
    match its SHA-256; FileNotFoundError if it does not exist."""
    op = "load_checkpoint"
    path = _check_path(op, path)

    def refuse(why):
        return CheckpointError(f"{op}: {path}: {why}")

    with open(path, "rb") as f:
        magic = f.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        raise refuse("not a metacore checkpoint (not an .npz/zip file)")

    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if _HEADER not in names or _DIGEST not in names:
                raise refuse("not a metacore checkpoint (an .npz without its header/digest)")
            members = {name: npz[name] for name in names}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:
        # Damage surfaces as many types: BadZipFile (truncated, bad CRC), NotImplementedError
        # (a flipped zip version or compression field), RuntimeError (a flipped encryption
        # flag), ValueError (a damaged .npy header), ... All mean the same: the file is bad.
        raise refuse(f"corrupt or truncated ({type(e).__name__}: {e})") from e

    for name, value in members.items():
        if not isinstance(value, np.ndarray):     # np.load hands back raw bytes for non-.npy
            raise refuse(f"member {name!r} is not an .npy array")
    header_arr = members.pop(_HEADER)
    digest = members.pop(_DIGEST)
    if header_arr.dtype != np.uint8 or header_arr.ndim != 1:
        raise refuse("corrupt header (expected a 1-D uint8 array)")
    header = header_arr.tobytes()
    if digest.dtype != np.uint8 or digest.shape != (32,):
        raise refuse("corrupt digest (expected 32 uint8 bytes)")
    if not np.array_equal(_digest(header, members), digest):
        raise refuse("SHA-256 mismatch: the content is corrupt")

    try:
        info = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:   # impossible once the digest matched,
        raise refuse(f"header is not valid JSON ({e})") from e   # unless written elsewhere
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise refuse(f"not a metacore checkpoint (format {info.get('format')!r})"
                     if isinstance(info, dict) else "not a metacore checkpoint")
    if info.get("version") != VERSION:
        raise refuse(f"unsupported checkpoint version {info.get('version')!r} "
                     f"(this code reads version {VERSION})")
    if sorted(members) != info.get("arrays"):
        raise refuse(f"array list {info.get('arrays')} does not match the file's members "
                     f"{sorted(members)}")
    return members, info["meta"]


# --- RNG state ---------------------------------------------------------------------------------

_PCG_NAMES = ("PCG64", "PCG64DXSM")


def rng_state(rng):
    """The state of a numpy Generator backed by PCG64 (the default_rng bit generator) or
    PCG64DXSM, as a JSON-able dict of plain ints (128-bit ints included; Python's json writes
    and reads them exactly). Put it in a checkpoint's meta; rng_from_state / set_rng_state
    continue the same stream of draws."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng_state: expected a numpy.random.Generator, got "
                        f"{type(rng).__name__}")
    s = rng.bit_generator.state
    if s["bit_generator"] not in _PCG_NAMES:
        raise TypeError(f"rng_state: only {_PCG_NAMES} bit generators are supported, got "
                        f"{s['bit_generator']}")
    return {"bit_generator": s["bit_generator"],
            "state": int(s["state"]["state"]), "inc": int(s["state"]["inc"]),
            "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}


def _numpy_state(op, state):
    """Check a dict from rng_state and turn it back into numpy's bit_generator.state layout."""
    if not isinstance(state, dict):
        raise TypeError(f"{op}: state must be a dict from rng_state, got {type(state).__name__}")
    want = {"bit_generator", "state", "inc", "has_uint32", "uinteger"}
    if set(state) != want:
        raise ValueError(f"{op}: state keys {sorted(state)} do not match {sorted(want)}")
    if state["bit_generator"] not in _PCG_NAMES:
        raise ValueError(f"{op}: bit_generator must be one of {_PCG_NAMES}, "
                         f"got {state['bit_generator']!r}")
    limits = {"state": 2 ** 128, "inc": 2 ** 128, "has_uint32": 2, "uinteger": 2 ** 32}
    for key, limit in limits.items():
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or not 0 <= value < limit:
            raise ValueError(f"{op}: {key} must be an int in [0, {limit}), got {value!r}")
    if state["inc"] % 2 == 0:
        raise ValueError(f"{op}: inc must be odd (PCG64 increments always are), "
                         f"got {state['inc']}")
    return {"bit_generator": state["bit_generator"],
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def rng_from_state(state):
    """A new numpy Generator whose draws continue exactly where the saved one's left off."""
    s = _numpy_state("rng_from_state", state)
    bit_gen = getattr(np.random, s["bit_generator"])()
    bit_gen.state = s
    return np.random.Generator(bit_gen)


def set_rng_state(rng, state):
    """Restore a saved state into an existing Generator (its bit generator must be the same
    kind). Modifies rng in place; returns None."""
    op = "set_rng_state"
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: expected a numpy.random.Generator, got {type(rng).__name__}")
    s = _numpy_state(op, state)
    have = type(rng.bit_generator).__name__
    if have != s["bit_generator"]:
        raise ValueError(f"{op}: the state is for {s['bit_generator']}, the Generator uses "
                         f"{have}")
    rng.bit_generator.state = s
