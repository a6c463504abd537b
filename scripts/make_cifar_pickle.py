#!/usr/bin/env python3
"""Writes a tiny synthetic CIFAR-10 and CIFAR-100 in both versions, binary and python.

Both versions hold the same pseudo-random images and labels, so that msad's two readers
(src/data/cifar_format.rs for the binary records, src/data/cifar_pickle.rs for the pickles) can
be checked against each other. Nothing is downloaded.

    python3 scripts/make_cifar_pickle.py OUT                    # 3 images per file
    python3 scripts/make_cifar_pickle.py OUT --per-file 2 --seed 7
    scripts/.venv/bin/python scripts/make_cifar_pickle.py OUT   # the self-check also uses numpy

Files written under OUT (the archives' folder and file names):

    cifar-10-batches-bin/data_batch_1.bin .. data_batch_5.bin, test_batch.bin
    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    cifar-100-binary/train.bin, test.bin
    cifar-100-python/train, test

A binary record is the label byte(s) (CIFAR-100: coarse, then fine), then the 3,072 pixel bytes
(red plane, green plane, blue plane, each 32x32 row-major). A python file is a pickled dict with
`batch_label`, `labels` (CIFAR-100: `fine_labels` and `coarse_labels`), `data` (a numpy uint8
array of shape (N, 3072), the same planar rows) and `filenames`, laid out opcode by opcode as
Python 2's cPickle (protocol 2) wrote the real files: strings as SHORT_BINSTRING/BINSTRING, the
array as numpy's `_reconstruct` + BUILD with the pixels as one BINSTRING. Python 3's pickle cannot
write that layout (with protocol 2 it writes str as BINUNICODE and bytes through `_codecs.encode`;
from protocol 3 on, bytes as BINBYTES), so the opcodes are emitted here, with the `pickle`
module's opcode constants.

The writer uses the standard library only. After writing, every pickle is checked: with
`pickletools` (a well-formed opcode stream), and loaded as torchvision's CIFAR10 loads it
(`pickle.load(f, encoding="latin1")`, then `entry["data"]` and `entry["labels"]` or
`entry["fine_labels"]`), with numpy when it is importable, otherwise with stand-ins for the three
numpy names the files use. The loaded arrays and labels must equal the binary records.

The bytes depend on --per-file and --seed only: running the script again writes the same files.
"""

import argparse
import io
import pickle
import pickletools
import struct
import sys
from pathlib import Path

SIDE = 32
IMAGE_BYTES = 3 * SIDE * SIDE
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class Random:
    """splitmix64: deterministic on every Python version (unlike `random` across releases)."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFF_FFFF_FFFF_FFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E37_79B9_7F4A_7C15) & 0xFFFF_FFFF_FFFF_FFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & 0xFFFF_FFFF_FFFF_FFFF
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & 0xFFFF_FFFF_FFFF_FFFF
        return z ^ (z >> 31)

    def bytes(self, n: int) -> bytes:
        words = (n + 7) // 8
        return struct.pack(f"<{words}Q", *(self.next() for _ in range(words)))[:n]

    def below(self, n: int) -> int:
        return self.next() % n


class CPickler:
    """Emits pickle opcodes in the order and form Python 2's cPickle uses with protocol 2."""

    BATCH = 1000  # cPickle's batch size for APPENDS and SETITEMS

    def __init__(self):
        self.out = io.BytesIO()
        self.memo = 0
        self.op(pickle.PROTO + b"\x02")

    def op(self, data: bytes) -> "CPickler":
        self.out.write(data)
        return self

    def put(self) -> "CPickler":
        """Memoizes the stack top, as cPickle does after each string, tuple, list, dict, global
        and REDUCE result."""
        if self.memo < 256:
            self.op(pickle.BINPUT + bytes([self.memo]))
        else:
            self.op(pickle.LONG_BINPUT + struct.pack("<I", self.memo))
        self.memo += 1
        return self

    def int(self, value: int) -> "CPickler":
        if 0 <= value < 0x100:
            return self.op(pickle.BININT1 + bytes([value]))
        if 0 <= value < 0x10000:
            return self.op(pickle.BININT2 + struct.pack("<H", value))
        if -0x8000_0000 <= value < 0x8000_0000:
            return self.op(pickle.BININT + struct.pack("<i", value))
        encoded = pickle.encode_long(value)
        return self.op(pickle.LONG1 + bytes([len(encoded)]) + encoded)

    def str(self, data: bytes) -> "CPickler":
        """A Python 2 `str` (bytes)."""
        if len(data) < 256:
            self.op(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.op(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        return self.put()

    def none(self) -> "CPickler":
        return self.op(pickle.NONE)

    def bool(self, value: bool) -> "CPickler":
        return self.op(pickle.NEWTRUE if value else pickle.NEWFALSE)

    def global_(self, module: str, name: str) -> "CPickler":
        return self.op(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")).put()

    def tuple(self, items) -> "CPickler":
        """`items` are callables that each emit one object."""
        if not items:
            return self.op(pickle.EMPTY_TUPLE)
        short = {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(items))
        if short is None:
            self.op(pickle.MARK)
        for emit in items:
            emit()
        return self.op(short or pickle.TUPLE).put()

    def _batched(self, items, one: bytes, many: bytes) -> None:
        for start in range(0, len(items), self.BATCH):
            batch = items[start : start + self.BATCH]
            if len(batch) > 1:
                self.op(pickle.MARK)
            for emit in batch:
                emit()
            self.op(many if len(batch) > 1 else one)

    def list(self, items) -> "CPickler":
        self.op(pickle.EMPTY_LIST).put()
        self._batched(items, pickle.APPEND, pickle.APPENDS)
        return self

    def dict(self, pairs) -> "CPickler":
        """`pairs` are (key, emit-value) with str keys."""
        self.op(pickle.EMPTY_DICT).put()

        def pair(key, emit):
            def both():
                self.str(key.encode("ascii"))
                emit()

            return both

        self._batched([pair(k, v) for k, v in pairs], pickle.SETITEM, pickle.SETITEMS)
        return self

    def uint8_array(self, rows: int, cols: int, data: bytes) -> "CPickler":
        """numpy 1.x's `ndarray.__reduce__` for a C-order uint8 array, replayed:
        `_reconstruct(ndarray, (0,), 'b')`, then BUILD with
        `(1, (rows, cols), dtype('u1'), False, data)`."""
        assert len(data) == rows * cols
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.tuple(
            [
                lambda: self.global_("numpy", "ndarray"),
                lambda: self.tuple([lambda: self.int(0)]),
                lambda: self.str(b"b"),
            ]
        )
        self.op(pickle.REDUCE).put()
        self.tuple(
            [
                lambda: self.int(1),
                lambda: self.tuple([lambda: self.int(rows), lambda: self.int(cols)]),
                self.uint8_dtype,
                lambda: self.bool(False),
                lambda: self.str(data),
            ]
        )
        return self.op(pickle.BUILD)

    def uint8_dtype(self) -> "CPickler":
        """`dtype('u1', 0, 1)`, then BUILD with `(3, '|', None, None, None, -1, -1, 0)`."""
        self.global_("numpy", "dtype")
        self.tuple([lambda: self.str(b"u1"), lambda: self.int(0), lambda: self.int(1)])
        self.op(pickle.REDUCE).put()
        self.tuple(
            [
                lambda: self.int(3),
                lambda: self.str(b"|"),
                self.none,
                self.none,
                self.none,
                lambda: self.int(-1),
                lambda: self.int(-1),
                lambda: self.int(0),
            ]
        )
        return self.op(pickle.BUILD)

    def finish(self) -> bytes:
        self.op(pickle.STOP)
        return self.out.getvalue()


class Batch:
    """One file's images (planar rows) and labels, per label key."""

    def __init__(self, rng: Random, count: int, label_classes: dict, batch_label: str, first: int):
        self.planes = rng.bytes(count * IMAGE_BYTES)
        self.labels = {key: [rng.below(n) for _ in range(count)] for key, n in label_classes.items()}
        self.filenames = [f"synthetic_s_{first + i:06d}.png" for i in range(count)]
        self.batch_label = batch_label
        self.count = count

    def binary(self, label_keys) -> bytes:
        out = bytearray()
        for i in range(self.count):
            out += bytes(self.labels[key][i] for key in label_keys)
            out += self.planes[i * IMAGE_BYTES : (i + 1) * IMAGE_BYTES]
        return bytes(out)

    def pickle(self, key_order) -> bytes:
        p = CPickler()

        def labels(key):
            return lambda: p.list([lambda v=v: p.int(v) for v in self.labels[key]])

        values = {
            "batch_label": lambda: p.str(self.batch_label.encode("ascii")),
            "data": lambda: p.uint8_array(self.count, IMAGE_BYTES, self.planes),
            "filenames": lambda: p.list([lambda f=f: p.str(f.encode("ascii")) for f in self.filenames]),
        }
        values.update({key: labels(key) for key in self.labels})
        p.dict([(key, values[key]) for key in key_order])
        return p.finish()


# Per dataset: binary folder, python folder, label keys in binary order with their class counts,
# the python dict's key order (that of the real files), and the files with their batch labels.
DATASETS = {
    "cifar10": {
        "bin": "cifar-10-batches-bin",
        "py": "cifar-10-batches-py",
        "labels": {"labels": 10},
        "keys": ["batch_label", "labels", "data", "filenames"],
        "files": [(f, f"training batch {i + 1} of 5") for i, f in enumerate(CIFAR10_TRAIN)]
        + [("test_batch", "testing batch 1 of 1")],
    },
    "cifar100": {
        "bin": "cifar-100-binary",
        "py": "cifar-100-python",
        "labels": {"coarse_labels": 20, "fine_labels": 100},
        "keys": ["filenames", "batch_label", "fine_labels", "coarse_labels", "data"],
        "files": [("train", "training batch 1 of 1"), ("test", "testing batch 1 of 1")],
    },
}


def write(out: Path, per_file: int, seed: int) -> list:
    """Writes every file; returns (dataset, batch, binary path, pickle path) to check."""
    written = []
    for index, (name, spec) in enumerate(DATASETS.items()):
        rng = Random(seed * 1_000_003 + index)
        (out / spec["bin"]).mkdir(parents=True, exist_ok=True)
        (out / spec["py"]).mkdir(parents=True, exist_ok=True)
        first = 0
        for file, batch_label in spec["files"]:
            batch = Batch(rng, per_file, spec["labels"], batch_label, first)
            first += per_file
            bin_path = out / spec["bin"] / f"{file}.bin"
            py_path = out / spec["py"] / file
            bin_path.write_bytes(batch.binary(list(spec["labels"])))
            py_path.write_bytes(batch.pickle(spec["keys"]))
            written.append((name, batch, bin_path, py_path))
    return written


# ---- Self-check ---------------------------------------------------------------------------------

ALLOWED_OPCODES = {
    "PROTO", "EMPTY_DICT", "BINPUT", "LONG_BINPUT", "MARK", "SETITEMS", "SETITEM", "SHORT_BINSTRING",
    "BINSTRING", "EMPTY_LIST", "APPENDS", "APPEND", "BININT1", "BININT2", "BININT", "LONG1", "GLOBAL",
    "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "REDUCE", "BUILD", "NONE", "NEWFALSE", "STOP",
}


class _StandIn:
    """Stand-ins for the three numpy names, when numpy is not importable: they record what
    numpy would receive, and execute nothing else."""

    class ndarray:
        def __setstate__(self, state):
            version, shape, dtype, fortran, data = state
            assert version == 1 and dtype.name == "u1" and fortran is False, state[:4]
            # numpy accepts the latin1-decoded str a Python 2 pickle yields and encodes it back.
            self.shape = shape
            self.data = data.encode("latin1") if isinstance(data, str) else bytes(data)

    class dtype:
        def __init__(self, name, align, copy):
            self.name = name

        def __setstate__(self, state):
            assert state == (3, "|", None, None, None, -1, -1, 0), state

    @staticmethod
    def _reconstruct(cls, shape, typecode):
        assert cls is _StandIn.ndarray and shape == (0,) and typecode == "b"
        return cls()


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        table = {
            ("numpy.core.multiarray", "_reconstruct"): _StandIn._reconstruct,
            ("numpy", "ndarray"): _StandIn.ndarray,
            ("numpy", "dtype"): _StandIn.dtype,
        }
        if (module, name) not in table:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return table[(module, name)]


def check(written: list) -> str:
    try:
        import numpy as np
    except ImportError:
        np = None
    for name, batch, bin_path, py_path in written:
        raw = py_path.read_bytes()
        pickletools.dis(raw, out=io.StringIO())  # raises on a malformed stream
        ops = {opcode.name for opcode, _, _ in pickletools.genops(raw)}
        assert ops <= ALLOWED_OPCODES, (py_path, ops - ALLOWED_OPCODES)

        label_keys = list(DATASETS[name]["labels"])
        width = len(label_keys) + IMAGE_BYTES
        records = bin_path.read_bytes()
        assert len(records) == batch.count * width, bin_path
        with open(py_path, "rb") as f:
            if np is not None:
                entry = pickle.load(f, encoding="latin1")  # torchvision.datasets.CIFAR10's call
            else:
                entry = _StandInUnpickler(f, encoding="latin1").load()
        targets = entry["labels"] if "labels" in entry else entry["fine_labels"]
        data = entry["data"]
        if np is not None:
            assert isinstance(data, np.ndarray) and data.dtype == np.uint8, (py_path, type(data))
            assert data.shape == (batch.count, IMAGE_BYTES) and data.flags.c_contiguous, data.shape
            table = np.frombuffer(records, dtype=np.uint8).reshape(batch.count, width)
            assert np.array_equal(data, table[:, len(label_keys):]), py_path
            for column, key in enumerate(label_keys):
                assert entry[key] == table[:, column].tolist(), (py_path, key)
            # torchvision's HWC images equal the interleaved pixels msad's readers return.
            hwc = data.reshape(-1, 3, SIDE, SIDE).transpose((0, 2, 3, 1))
            for i in range(batch.count):
                planes = table[i, len(label_keys):]
                interleaved = planes.reshape(3, SIDE * SIDE).T.reshape(SIDE, SIDE, 3)
                assert np.array_equal(hwc[i], interleaved)
        else:
            assert tuple(data.shape) == (batch.count, IMAGE_BYTES), data.shape
            for i in range(batch.count):
                record = records[i * width : (i + 1) * width]
                assert data.data[i * IMAGE_BYTES : (i + 1) * IMAGE_BYTES] == record[len(label_keys):]
                for column, key in enumerate(label_keys):
                    assert entry[key][i] == record[column], (py_path, key, i)
        assert targets == batch.labels[label_keys[-1]], py_path
        assert entry["filenames"] == batch.filenames and entry["batch_label"] == batch.batch_label
    return f"numpy {np.__version__}" if np is not None else "stand-ins for numpy (not importable)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the four folders into")
    parser.add_argument("--per-file", type=int, default=3, help="images per file (default: 3)")
    parser.add_argument("--seed", type=int, default=20240229, help="pseudo-random seed")
    args = parser.parse_args()
    if args.per_file < 1:
        parser.error("--per-file must be at least 1")
    written = write(args.out, args.per_file, args.seed)
    how = check(written)
    print(f"{len(written)} binary and {len(written)} python files written to {args.out}, "
          f"{args.per_file} images each; checked with pickle.load and {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
