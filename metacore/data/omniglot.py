"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, Science 350:1332), shipped with metacore.

All 1623 characters x 20 drawings at 28x28, in two versions, with labels, two standard
few-shot splits and Lake's 20-run one-shot benchmark. The files in this folder are made by
scripts/build_omniglot.py from ../shared/data/omniglot (see its README for provenance).

Versions (argument `version` of load_omniglot; both give float images in [0, 1], ink = 1):
  "ink28"  Lanczos-resized grayscale (Pillow, 105 -> 28), as used by the metric-based methods
           (ProtoNet, Matching, Relation, Siamese networks). Stored as uint8, read as /255.
  "maml"   binary 0/1 images exactly as MAML's data/omniglot_resized/resize_images.py makes
           them: that script asks for LANCZOS, but Pillow resizes mode-'1' images with NEAREST,
           so MAML really trains on nearest-neighbour binary images. Stored bit-packed.

Splits (split_characters):
  "vinyals"  Vinyals et al. (2016): 1028 / 172 / 423 train / val / test characters, from
             jakesnell/prototypical-networks data/omniglot/splits/vinyals (MIT, J. Snell).
  "maml"     Finn et al. (2017), cbfinn/maml data_generator.py: random.seed(1);
             random.shuffle(character_folders); num_val = 100; num_train = 1200 - num_val;
             train = [:1100], val = [1100:1200], test = [1200:] (1100 / 100 / 423).
             MAML's order before the shuffle came from os.listdir and cannot be reproduced.
             Here it is defined as the character axis, i.e. char_id ascending (1..1623), and
             shuffled with random.Random(1).shuffle (the same Mersenne Twister stream as
             random.seed(1); random.shuffle). So this is MAML's rule, not MAML's exact draw.

Classes and rotations: with rotate=True, EpisodeSampler treats each (character, quarter turn
r in {0, 1, 2, 3}) as its own class (Santoro et al. 2016, Vinyals et al. 2016, Finn et al.
2017), so the class pool is 4x the characters. A class with r quarter turns shows every one
of its drawings as np.rot90(image, r): counter-clockwise, the same as tf.image.rot90 in MAML.

Lake's benchmark (lake_run / lake_episodes): 20 runs of 20-way 1-shot classification within
one alphabet of the evaluation set; run r has one training drawing for each of its 20
characters and 20 test drawings, each labelled with its training class.

Integrity: every file is checked against the size and sha256 in _SHIPPED before it is parsed,
read with allow_pickle=False (nothing is unpickled), and each array's shape and dtype are
checked after loading.

Licenses: Omniglot data MIT, Copyright (c) 2015 Brenden Lake (LICENSE-omniglot-Lake.txt);
Vinyals split lists MIT, Copyright (c) 2017 Jake Snell (LICENSE-vinyals-split-Snell.txt).

Shape letters:
  C  characters (1623)             D  drawings per character (20)
  A  alphabets (50)                H, W  image height and width (28, 28)
  T  tasks in a batch              N  classes per task (n_way)
  K  support drawings per class    Q  query drawings per class
  R  Lake runs (20)                J  classes (and test items) per Lake run (20)
"""
import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np

from metacore.errors import UserError
from metacore.validate import FLOAT_DTYPES, check_float_array

DATA_DIR = os.path.dirname(os.path.abspath(__file__))

N_CHARS, N_DRAWINGS, N_ALPHABETS, IMG = 1623, 20, 50, 28
N_RUNS, RUN_WAY = 20, 20
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SCHEMES = ("vinyals", "maml")
# characters in the train / val / test parts of each split scheme, and drawings per character
SPLIT_SIZES = {"vinyals": {"train": 1028, "val": 172, "test": 423},
               "maml": {"train": 1100, "val": 100, "test": 423}}
N_DRAWINGS = 20
VERSIONS = {"ink28": "omniglot_ink28.npz", "maml": "omniglot_ink28_maml.npz"}
META_FILE = "omniglot_meta.npz"

# file -> (size in bytes, sha256); printed by scripts/build_omniglot.py
_SHIPPED = {
    "omniglot_ink28.npz": (6607050, "dcc84eed66177de4885cdb2e6a35c44ae5b4d755f999929947806e119e2e7600"),
    "omniglot_ink28_maml.npz": (858004, "3ac889f242531e86884c2cdffa456c5c8f5fc4a23c08b67bcbd5bd809a69f2b7"),
    "omniglot_meta.npz": (8747, "cac3dafcc8207008f93f95ef6e4fea70faa82e82f673e07db43bf637fbdbbed5"),
}

_C, _D, _R = N_CHARS, N_DRAWINGS, N_RUNS
# file -> {key: (shape, dtype)}; dtype "U" = any unicode string array
_LAYOUT = {
    "omniglot_ink28.npz": {"ink28": ((_C, _D, IMG, IMG), np.uint8)},
    "omniglot_ink28_maml.npz": {"ink28_maml_packed": ((_C, _D, IMG * IMG // 8), np.uint8)},
    "omniglot_meta.npz": {
        "char_id": ((_C,), np.int16),
        "alphabet_idx": ((_C,), np.int16),
        "char_in_alphabet": ((_C,), np.int16),
        "alphabet_names": ((N_ALPHABETS,), "U"),
        "alphabet_first_char_id": ((N_ALPHABETS,), np.int16),
        "alphabet_num_chars": ((N_ALPHABETS,), np.int16),
        "background": ((_C,), np.bool_),
        "vinyals_split": ((_C,), np.int8),
        "maml_split": ((_C,), np.int8),
        "lake_train_char": ((_R, RUN_WAY), np.int16),
        "lake_train_drawing": ((_R, RUN_WAY), np.int8),
        "lake_test_char": ((_R, RUN_WAY), np.int16),
        "lake_test_drawing": ((_R, RUN_WAY), np.int8),
        "lake_test_label": ((_R, RUN_WAY), np.int8),
        "lake_run_alphabet": ((_R,), np.int16),
    },
}


@dataclass(frozen=True)
class Omniglot:
    """The whole data set, in memory. Arrays are read-only; index them, don't edit them.

    images            (C, D, H, W) float32/float64 in [0, 1], ink = 1
    version           "ink28" or "maml"
    char_id           (C,) int64  global Omniglot number (XXXX in XXXX_YY.png); = index + 1
    alphabet_idx      (C,) int64  index into alphabet_names
    char_in_alphabet  (C,) int64  1-based characterNN folder number within its alphabet
    alphabet_names    tuple of A str, in char_id order (30 background, then 20 evaluation)
    background        (C,) bool   True for Lake's background set (char_id 1..964)
    vinyals_split     (C,) int8   0/1/2 = train/val/test (see split_characters)
    maml_split        (C,) int8   0/1/2 = train/val/test
    lake_train_char, lake_train_drawing  (R, J) int64: run r, class j's single training image
                                 is images[lake_train_char[r, j], lake_train_drawing[r, j]]
    lake_test_char, lake_test_drawing    (R, J) int64: run r, test item t
    lake_test_label   (R, J) int64  class j (0..J-1) of each test item
    lake_run_alphabet (R,) int64   alphabet index of each run
    """
    images: np.ndarray
    version: str
    char_id: np.ndarray
    alphabet_idx: np.ndarray
    char_in_alphabet: np.ndarray
    alphabet_names: tuple
    background: np.ndarray
    vinyals_split: np.ndarray
    maml_split: np.ndarray
    lake_train_char: np.ndarray
    lake_train_drawing: np.ndarray
    lake_test_char: np.ndarray
    lake_test_drawing: np.ndarray
    lake_test_label: np.ndarray
    lake_run_alphabet: np.ndarray


def _read_verified(folder, fname):
    """Read one shipped npz after checking its size and sha256; return {key: array}.

    The bytes are read once, hashed, and parsed from memory, so what is checked is what is
    loaded. Raises FileNotFoundError if missing, ValueError if corrupt, truncated or wrong.
    """
    path = os.path.join(folder, fname)
    if fname not in _SHIPPED:
        raise ValueError(f"load_omniglot: no expected sha256 for {fname} in _SHIPPED "
                         f"(run scripts/build_omniglot.py and paste its block)")
    want_size, want_sha = _SHIPPED[fname]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_omniglot: {path} is missing "
                                f"(run scripts/build_omniglot.py to make it)")
    with open(path, "rb") as f:
        blob = f.read()
    got_sha = hashlib.sha256(blob).hexdigest()
    if got_sha != want_sha:
        what = "truncated" if len(blob) < want_size else "corrupt"
        raise ValueError(f"load_omniglot: {path} is {what}: sha256 {got_sha}, expected "
                         f"{want_sha} ({len(blob)} bytes, expected {want_size})")
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    layout = _LAYOUT[fname]
    if set(arrays) != set(layout):
        raise ValueError(f"load_omniglot: {path} has keys {sorted(arrays)}, "
                         f"expected {sorted(layout)}")
    for key, (shape, dtype) in layout.items():
        a = arrays[key]
        ok_dtype = a.dtype.kind == "U" if dtype == "U" else a.dtype == np.dtype(dtype)
        if a.shape != shape or not ok_dtype:
            raise ValueError(f"load_omniglot: {path}: {key} has shape {a.shape} dtype {a.dtype}, "
                             f"expected shape {shape} dtype {np.dtype(dtype)}")
    return arrays


def _check_meta(m, path):
    """Value checks the indexing below relies on."""
    def bad(msg):
        raise ValueError(f"load_omniglot: {path}: {msg}")
    if not np.array_equal(m["char_id"], np.arange(1, N_CHARS + 1)):
        bad("char_id is not 1..1623 in order")
    if m["alphabet_idx"].min() < 0 or m["alphabet_idx"].max() >= N_ALPHABETS:
        bad("alphabet_idx out of range")
    for key in ("vinyals_split", "maml_split"):
        if not np.isin(m[key], (0, 1, 2)).all():
            bad(f"{key} has values outside 0/1/2")
    for key in ("lake_train_char", "lake_test_char"):
        if m[key].min() < 0 or m[key].max() >= N_CHARS:
            bad(f"{key} out of range")
    for key in ("lake_train_drawing", "lake_test_drawing"):
        if m[key].min() < 0 or m[key].max() >= N_DRAWINGS:
            bad(f"{key} out of range")
    if m["lake_test_label"].min() < 0 or m["lake_test_label"].max() >= RUN_WAY:
        bad("lake_test_label out of range")
    if m["lake_run_alphabet"].min() < 0 or m["lake_run_alphabet"].max() >= N_ALPHABETS:
        bad("lake_run_alphabet out of range")


def _frozen(a, dtype=None):
    a = np.array(a, dtype=dtype)            # fresh copy
    a.flags.writeable = False
    return a


def load_omniglot(path=None, version="ink28", dtype=np.float32):
    """Load all of Omniglot from the shipped files; returns an Omniglot.

    path: folder holding the shipped files (default: this package's folder).
    version: "ink28" (Lanczos grayscale) or "maml" (MAML's nearest-neighbour binary images).
    dtype: float32 or float64 for the images.
    Each file is verified (size, sha256) before it is parsed; a corrupt, truncated or
    malformed file raises ValueError naming the file and the expected and actual hash.
    """
    if version not in VERSIONS:
        raise ValueError(f"load_omniglot: version must be one of {sorted(VERSIONS)}, "
                         f"got {version!r}")
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"load_omniglot: dtype must be float32 or float64, got {dtype}")
    folder = DATA_DIR if path is None else os.fspath(path)

    meta = _read_verified(folder, META_FILE)
    _check_meta(meta, os.path.join(folder, META_FILE))
    pix = _read_verified(folder, VERSIONS[version])
    if version == "ink28":
        images = pix["ink28"].astype(dtype)                  # (C, D, H, W) 0..255
        images /= 255
    else:
        bits = np.unpackbits(pix["ink28_maml_packed"], axis=-1, count=IMG * IMG)
        images = bits.reshape(N_CHARS, N_DRAWINGS, IMG, IMG).astype(dtype)
    images.flags.writeable = False

    i64 = np.int64
    return Omniglot(
        images=images,
        version=version,
        char_id=_frozen(meta["char_id"], i64),
        alphabet_idx=_frozen(meta["alphabet_idx"], i64),
        char_in_alphabet=_frozen(meta["char_in_alphabet"], i64),
        alphabet_names=tuple(str(s) for s in meta["alphabet_names"]),
        background=_frozen(meta["background"]),
        vinyals_split=_frozen(meta["vinyals_split"]),
        maml_split=_frozen(meta["maml_split"]),
        lake_train_char=_frozen(meta["lake_train_char"], i64),
        lake_train_drawing=_frozen(meta["lake_train_drawing"], i64),
        lake_test_char=_frozen(meta["lake_test_char"], i64),
        lake_test_drawing=_frozen(meta["lake_test_drawing"], i64),
        lake_test_label=_frozen(meta["lake_test_label"], i64),
        lake_run_alphabet=_frozen(meta["lake_run_alphabet"], i64),
    )


_LOADED = {}


def load_omniglot_once(version, dtype):
    """load_omniglot(version=version, dtype=dtype) from the shipped files, read once per
    process and shared (its arrays are read-only)."""
    key = (version, np.dtype(dtype))
    if key not in _LOADED:
        _LOADED[key] = load_omniglot(version=version, dtype=dtype)
    return _LOADED[key]


def split_characters(data, scheme="vinyals", part="train"):
    """Character indices (into data.images axis 0) of one part of a split, ascending int64.

    scheme: "vinyals" (1028/172/423) or "maml" (1100/100/423); part: "train", "val", "test".
    """
    if scheme not in SCHEMES:
        raise ValueError(f"split_characters: scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if part not in SPLIT_CODES:
        raise ValueError(f"split_characters: part must be one of {list(SPLIT_CODES)}, got {part!r}")
    codes = data.vinyals_split if scheme == "vinyals" else data.maml_split
    return np.flatnonzero(codes == SPLIT_CODES[part]).astype(np.int64)


@dataclass(frozen=True)
class Episode:
    """A batch of T few-shot tasks, NHWC.

    support_x (T, N*K, H, W, 1), support_y (T, N*K) int64 in 0..N-1
    query_x   (T, N*Q, H, W, 1), query_y   (T, N*Q) int64 in 0..N-1
    char      (T, N) int64  character index (into images axis 0) of class n
    rotation  (T, N) int64  quarter turns (counter-clockwise) of class n
    support_drawing (T, N*K), query_drawing (T, N*Q) int64: drawing index of each row
    Row i of support_x[t] is np.rot90(images[char[t, y], support_drawing[t, i]], rotation[t, y])
    with y = support_y[t, i]; the same for the query.
    """
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    char: np.ndarray
    rotation: np.ndarray
    support_drawing: np.ndarray
    query_drawing: np.ndarray


def _check_count(op, name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise UserError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_dtype(op, dtype):
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype}")
    return dtype


class EpisodeSampler:
    """Seeded sampler of N-way K-shot tasks with Q queries per class.

    images: (C, D, H, W) float32/float64, e.g. load_omniglot().images; kept by reference,
        not copied, so don't edit it while sampling (the loader's arrays are read-only).
    char_indices: 1-D distinct ints into images axis 0, the characters to draw from
        (e.g. split_characters(data, "vinyals", "train")).
    rotate: True makes each (character, quarter turn) its own class, so the pool holds
        4 * len(char_indices) classes; False uses the characters as they are.
    seed: int for np.random.default_rng; the same seed gives the same episodes, call by call.
    dtype: float32 (default) or float64 for the images returned.

    Each task draws N distinct classes from the pool, in random order (class n gets label n),
    and for each class K + Q distinct drawings: the first K are its support, the rest its
    query. Rows are grouped by label: support_y[t] = [0]*K + [1]*K + ... + [N-1]*K.
    """

    def __init__(self, images, char_indices, n_way, k_shot, q_query, *, rotate=True, seed,
                 dtype=np.float32):
        op = "EpisodeSampler"
        check_float_array(op, "images", images, ndim=4)    # (C, D, H, W)
        chars = np.asarray(char_indices)
        if chars.ndim != 1 or chars.size == 0:
            raise ValueError(f"{op}: char_indices must be a non-empty 1-D array, "
                             f"got shape {chars.shape}")
        if not np.issubdtype(chars.dtype, np.integer):
            raise TypeError(f"{op}: char_indices must have an integer dtype, got {chars.dtype}")
        n_chars, n_drawings = images.shape[:2]
        if chars.min() < 0 or chars.max() >= n_chars:
            raise ValueError(f"{op}: char_indices must lie in [0, {n_chars}), "
                             f"got values {chars.min()}..{chars.max()}")
        if np.unique(chars).size != chars.size:
            raise ValueError(f"{op}: char_indices has repeated characters")
        self.n_way = _check_count(op, "n_way", n_way, 1)
        self.k_shot = _check_count(op, "k_shot", k_shot, 1)
        self.q_query = _check_count(op, "q_query", q_query, 0)
        if self.k_shot + self.q_query > n_drawings:
            raise UserError(f"{op}: k_shot + q_query = {self.k_shot + self.q_query} exceeds "
                            f"the {n_drawings} drawings per character")
        if not isinstance(rotate, (bool, np.bool_)):
            raise TypeError(f"{op}: rotate must be a bool, got {type(rotate).__name__}")
        self.n_rot = 4 if rotate else 1
        if self.n_rot == 4 and images.shape[2] != images.shape[3]:
            raise ValueError(f"{op}: rotate=True needs square images, got {images.shape[2:]}")
        self.n_classes = chars.size * self.n_rot
        if self.n_way > self.n_classes:
            raise UserError(f"{op}: n_way = {self.n_way} exceeds the class pool of "
                            f"{self.n_classes} ({chars.size} characters x {self.n_rot} "
                            f"rotation(s))")
        self.seed = _check_count(op, "seed", seed, 0)
        self.dtype = _check_dtype(op, dtype)
        self.images = images
        self.chars = chars.astype(np.int64)
        self._rng = np.random.default_rng(self.seed)

    @property
    def rng(self):
        """The sampler's numpy Generator: save and restore its state (metacore.checkpoint's
        rng_state / set_rng_state) for an exactly resumable episode stream."""
        return self._rng

    def sample(self, n_tasks):
        """Draw the next n_tasks tasks; returns an Episode (fresh arrays)."""
        T = _check_count("EpisodeSampler.sample", "n_tasks", n_tasks, 1)
        N, K, Q = self.n_way, self.k_shot, self.q_query
        rng = self._rng
        D = self.images.shape[1]
        # cls: (T, N) distinct class ids; class c is character chars[c // n_rot] turned c % n_rot
        cls = np.stack([rng.choice(self.n_classes, N, replace=False) for _ in range(T)])
        char = self.chars[cls // self.n_rot]                          # (T, N)
        rotation = cls % self.n_rot                                   # (T, N)
        # draw: (T, N, K+Q) distinct drawings per class, a random permutation's prefix
        draw = rng.permuted(np.tile(np.arange(D), (T, N, 1)), axis=-1)[..., :K + Q]
        x = self.images[char[:, :, None], draw].astype(self.dtype)    # (T, N, K+Q, H, W)
        for r in range(1, self.n_rot):
            turned = rotation == r                                    # (T, N)
            x[turned] = np.rot90(x[turned], r, axes=(-2, -1))
        H, W = x.shape[-2:]
        return Episode(
            support_x=np.ascontiguousarray(x[:, :, :K]).reshape(T, N * K, H, W, 1),
            support_y=np.tile(np.repeat(np.arange(N, dtype=np.int64), K), (T, 1)),
            query_x=np.ascontiguousarray(x[:, :, K:]).reshape(T, N * Q, H, W, 1),
            query_y=np.tile(np.repeat(np.arange(N, dtype=np.int64), Q), (T, 1)),
            char=char,
            rotation=rotation,
            support_drawing=draw[:, :, :K].reshape(T, N * K),
            query_drawing=draw[:, :, K:].reshape(T, N * Q),
        )


def lake_episodes(data, dtype=np.float32):
    """Lake's 20 one-shot runs as one Episode with T = R = 20 tasks, N = J = 20, K = 1.

    support_x (R, J, H, W, 1): run r's training image of class j; support_y[r] = 0..J-1.
    query_x (R, J, H, W, 1): run r's 20 test images; query_y (R, J) their labels. No rotation.
    """
    dtype = _check_dtype("lake_episodes", dtype)
    R, J = data.lake_train_char.shape
    H, W = data.images.shape[-2:]
    support = data.images[data.lake_train_char, data.lake_train_drawing]   # (R, J, H, W)
    query = data.images[data.lake_test_char, data.lake_test_drawing]       # (R, J, H, W)
    return Episode(
        support_x=support.astype(dtype).reshape(R, J, H, W, 1),
        support_y=np.tile(np.arange(J, dtype=np.int64), (R, 1)),
        query_x=query.astype(dtype).reshape(R, J, H, W, 1),
        query_y=np.array(data.lake_test_label, dtype=np.int64),
        char=np.array(data.lake_train_char, dtype=np.int64),
        rotation=np.zeros((R, J), dtype=np.int64),
        support_drawing=np.array(data.lake_train_drawing, dtype=np.int64),
        query_drawing=np.array(data.lake_test_drawing, dtype=np.int64),
    )


def lake_run(data, run, dtype=np.float32):
    """Run `run` (0-based, 0..19; Lake's run01 is 0) of Lake's benchmark.

    Returns (train_x (J, H, W, 1), test_x (J, H, W, 1), test_y (J,) int64): train_x[j] is the
    single training image of class j, test_y[t] the class of test_x[t].
    """
    R = data.lake_train_char.shape[0]
    run = _check_count("lake_run", "run", run, 0)
    if run >= R:
        raise ValueError(f"lake_run: run must be in 0..{R - 1}, got {run}")
    ep = lake_episodes(data, dtype)
    return ep.support_x[run].copy(), ep.query_x[run].copy(), ep.query_y[run].copy()
