"""Build the Omniglot files shipped in metacore/data/ from the project's offline copy.

    python scripts/build_omniglot.py                 # source ../shared/data/omniglot, out metacore/data
    python scripts/build_omniglot.py SRC --out DIR   # other folders

The source folder is the one described in ../shared/data/omniglot/README.md. Its three .npz
files and two license notices are checked against the sha256 sums written in that README
before anything is read, so a build can only start from the documented bytes.

What is written (see metacore/data/omniglot.py for the meaning of every array):
    omniglot_ink28.npz      (C, 20, 28, 28) uint8 Lanczos grayscale, 0 = paper, 255 = ink
    omniglot_ink28_maml.npz (C, 20, 98) uint8: the (C, 20, 28, 28) nearest-neighbour binary
                            images of MAML's resize_images.py, np.packbits over 784 pixels
    omniglot_meta.npz       labels, alphabets, Vinyals and MAML splits, Lake's 20 runs
    LICENSE-omniglot-Lake.txt, LICENSE-vinyals-split-Snell.txt   copied unchanged
C = 1623: the background set (char_id 1..964) then the evaluation set (965..1623), so the
character axis index is char_id - 1. The 105x105 originals (ink105) are not shipped.

Determinism: np.savez_compressed writes every member with the fixed zip date 1980-01-01, and
nothing else in the output depends on time, so two builds give the same bytes (with the same
zlib). The script prints size and sha256 of each output and compares them with the expected
sums in metacore/data/omniglot.py (_SHIPPED); after a deliberate change, paste the printed
block there.
"""
import argparse
import hashlib
import os
import random
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 of the source files, from ../shared/data/omniglot/README.md
SOURCE_SHA256 = {
    "omniglot_background.npz": "28f0298fb878d86ce26010cab9700abccd1ef71700de2b17d1f720f241cc1cc4",
    "omniglot_evaluation.npz": "50f6f9e38fd8dd427c5bfdf661a593e86fc91159098334dcec85c64f18c4d853",
    "lake_oneshot_runs.npz": "73beaa4016e62e22ce900ef28200f2a271beab4d582856d341d9c529cd26cbae",
    "LICENSE-omniglot-Lake.txt": "2efb425d9850e7bce985f151dc2ee1f4485e926a3582e08fd879cd28eb0388f5",
    "LICENSE-vinyals-split-Snell.txt": "8a8067902ed4ab00640fbf9cc831d0dbe387f6418304ae0cf1d636b8021f6b2c",
}

N_CHARS, N_BACKGROUND, N_DRAWINGS = 1623, 964, 20
MAML_SEED, MAML_TRAIN, MAML_VAL = 1, 1100, 100


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sources(src):
    for name, want in SOURCE_SHA256.items():
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"build_omniglot: source file {path} is missing")
        got = sha256_of(path)
        if got != want:
            raise ValueError(f"build_omniglot: source file {path} has sha256 {got}, "
                             f"expected {want} (see the README in that folder)")


def maml_split(n_chars, seed=MAML_SEED, n_train=MAML_TRAIN, n_val=MAML_VAL):
    """0/1/2 = train/val/test per character, following cbfinn/maml data_generator.py.

    MAML shuffles its character folders with random.seed(1); random.shuffle(...), keeps the
    first 1200 for meta-training, of which the last 100 are held out for validation
    (num_train = 1200 - 100), and tests on the rest. Its folder order came from os.listdir
    and cannot be reproduced, so here the order before shuffling is the character axis
    (char_id ascending). random.Random(1).shuffle is the same Mersenne Twister stream as
    random.seed(1); random.shuffle.
    """
    order = list(range(n_chars))
    random.Random(seed).shuffle(order)
    split = np.full(n_chars, 2, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_val]] = 1
    return split


def build_arrays(src):
    """Read the source npz files and return {output file: {key: array}}."""
    bg = np.load(os.path.join(src, "omniglot_background.npz"), allow_pickle=False)
    ev = np.load(os.path.join(src, "omniglot_evaluation.npz"), allow_pickle=False)
    runs = np.load(os.path.join(src, "lake_oneshot_runs.npz"), allow_pickle=False)

    char_id = np.concatenate([bg["char_id"], ev["char_id"]]).astype(np.int16)
    # the character axis is char_id - 1; everything below relies on that
    if not np.array_equal(char_id, np.arange(1, N_CHARS + 1)):
        raise ValueError("build_omniglot: char_id is not 1..1623 in order")
    n_bg_alpha = len(bg["alphabet_names"])
    names = np.concatenate([bg["alphabet_names"], ev["alphabet_names"]])
    names = names.astype(f"<U{max(len(s) for s in names)}")
    alphabet_idx = np.concatenate([bg["alphabet_idx"], ev["alphabet_idx"] + n_bg_alpha])

    ink28 = np.concatenate([bg["ink28"], ev["ink28"]])
    maml = np.concatenate([bg["ink28_maml"], ev["ink28_maml"]])
    if ink28.dtype != np.uint8 or maml.dtype != np.bool_:
        raise ValueError("build_omniglot: unexpected source dtypes")
    # packbits over the 784 pixels of one image, row-major, default 'big' bit order
    maml_packed = np.packbits(maml.reshape(N_CHARS, N_DRAWINGS, 28 * 28), axis=-1)

    name_to_idx = {str(s): i for i, s in enumerate(names)}
    meta = {
        "char_id": char_id,
        "alphabet_idx": alphabet_idx.astype(np.int16),
        "char_in_alphabet": np.concatenate([bg["char_in_alphabet"],
                                            ev["char_in_alphabet"]]).astype(np.int16),
        "alphabet_names": names,
        "alphabet_first_char_id": np.concatenate([bg["alphabet_first_char_id"],
                                                  ev["alphabet_first_char_id"]]).astype(np.int16),
        "alphabet_num_chars": np.concatenate([bg["alphabet_num_chars"],
                                              ev["alphabet_num_chars"]]).astype(np.int16),
        "background": np.arange(N_CHARS) < N_BACKGROUND,
        "vinyals_split": np.concatenate([bg["vinyals_split"], ev["vinyals_split"]]).astype(np.int8),
        "maml_split": maml_split(N_CHARS),
        # Lake's runs as 0-based (character index, drawing index) into the combined arrays
        "lake_train_char": (runs["train_char_id"].astype(np.int16) - 1),
        "lake_train_drawing": (runs["train_drawing"].astype(np.int8) - 1),
        "lake_test_char": (runs["test_char_id"].astype(np.int16) - 1),
        "lake_test_drawing": (runs["test_drawing"].astype(np.int8) - 1),
        "lake_test_label": runs["test_label"].astype(np.int8),
        "lake_run_alphabet": np.array([name_to_idx[str(s)] for s in runs["run_alphabet"]],
                                      dtype=np.int16),
    }
    return {
        "omniglot_ink28.npz": {"ink28": ink28},
        "omniglot_ink28_maml.npz": {"ink28_maml_packed": maml_packed},
        "omniglot_meta.npz": meta,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?",
                    default=os.path.join(ROOT, "..", "shared", "data", "omniglot"),
                    help="offline Omniglot folder (default: ../shared/data/omniglot from the repo root)")
    ap.add_argument("--out", default=os.path.join(ROOT, "metacore", "data"),
                    help="output folder (default: metacore/data)")
    args = ap.parse_args(argv)
    src = os.path.normpath(args.src)
    os.makedirs(args.out, exist_ok=True)

    check_sources(src)
    outputs = build_arrays(src)
    for fname, arrays in outputs.items():
        # savez_compressed appends .npz only when missing; write to a temp name, then rename
        tmp = os.path.join(args.out, fname + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, os.path.join(args.out, fname))
    for lic in ("LICENSE-omniglot-Lake.txt", "LICENSE-vinyals-split-Snell.txt"):
        shutil.copyfile(os.path.join(src, lic), os.path.join(args.out, lic))

    built = {f: (os.path.getsize(os.path.join(args.out, f)), sha256_of(os.path.join(args.out, f)))
             for f in outputs}
    total = sum(s for s, _ in built.values())
    print("_SHIPPED = {")
    for f, (size, digest) in built.items():
        print(f'    "{f}": ({size}, "{digest}"),')
    print("}")
    print(f"total {total} bytes ({total / 2**20:.2f} MiB) of npz in {args.out}")

    sys.path.insert(0, ROOT)
    from metacore.data import omniglot
    expected = getattr(omniglot, "_SHIPPED", {})
    if expected == built:
        print("matches _SHIPPED in metacore/data/omniglot.py")
        return 0
    print("DIFFERS from _SHIPPED in metacore/data/omniglot.py: paste the block above there "
          "if the change is deliberate")
    return 1


if __name__ == "__main__":
    sys.exit(main())
