"""Tests of flare_client's safetensors files, through the ``safetensors`` package and through
the pure-Python fallback, each reading what the other wrote.

Run with ``python3 -m unittest discover python/tests`` (the package cases are skipped where
numpy or safetensors is not importable).
"""

import os
import struct
import json
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flare_client import tensors  # noqa: E402

np = tensors._np
st = tensors._st


class Fallback:
    """Runs a block with the pure-Python path even where the package is importable."""

    def __enter__(self):
        self.saved = tensors._st
        tensors._st = None

    def __exit__(self, *exc):
        tensors._st = self.saved


def header_of(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


@unittest.skipIf(np is None, "numpy is not importable")
class WithNumpy(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.params = {
            "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
            "a.bias": np.array([1.5, -2.0], dtype=np.float64),
            "c.count": np.array(7, dtype=np.int64),
            "d.mask": np.array([True, False]),
            "e.half": np.array([0.5, 2.0], dtype=np.float16),
        }

    def tearDown(self):
        self.dir.cleanup()

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def assert_same(self, got):
        self.assertEqual(sorted(got), sorted(self.params))
        for k, v in self.params.items():
            self.assertEqual(got[k].dtype, v.dtype, k)
            self.assertEqual(got[k].shape, v.shape, k)
            self.assertTrue(np.array_equal(got[k], v), k)

    def test_fallback_round_trips(self):
        with Fallback():
            tensors.save(self.params, self.path("m"))
            self.assert_same(tensors.load(self.path("m")))

    @unittest.skipIf(st is None, "safetensors is not importable")
    def test_each_path_reads_what_the_other_wrote(self):
        tensors.save(self.params, self.path("lib"))
        with Fallback():
            self.assert_same(tensors.load(self.path("lib")))
            tensors.save(self.params, self.path("ours"))
        got = tensors.load(self.path("ours"))
        self.assert_same(got)
        got["b.weight"] += 1  # what a training script does with what it received
        self.assertEqual(float(got["b.weight"][0, 0]), 1.0)

    @unittest.skipIf(st is None, "safetensors is not importable")
    def test_the_package_writes_the_runtime_canonical_layout(self):
        # flare-node writes models with the safetensors crate's serializer: wider dtypes
        # first, names sorted within a dtype, no __metadata__, data 8-aligned.
        tensors.save(self.params, self.path("lib"))
        raw = header_of(self.path("lib"))
        self.assertEqual(len(raw) % 8, 0)
        header = json.loads(raw)
        self.assertNotIn("__metadata__", header)
        order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        width = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BOOL": 1}
        widths = [width[header[k]["dtype"]] for k in order]
        self.assertEqual(widths, sorted(widths, reverse=True))
        for dtype in width:
            names = [k for k in order if header[k]["dtype"] == dtype]
            self.assertEqual(names, sorted(names))

    def test_torch_like_and_fallback_tensors_are_accepted(self):
        class Fake:
            def __init__(self, a):
                self.a = a

            def detach(self):
                return self

            def cpu(self):
                return self

            def numpy(self):
                return self.a

        params = {"w": Fake(np.ones(3, dtype=np.float32)), "t": tensors.Tensor([2], "F32", [1.0, 2.0])}
        tensors.save(params, self.path("m"))
        got = tensors.load(self.path("m"))
        self.assertTrue(np.array_equal(got["w"], np.ones(3, dtype=np.float32)))
        self.assertTrue(np.array_equal(got["t"], np.array([1.0, 2.0], dtype=np.float32)))

    def test_bad_input_is_a_value_error_on_both_paths(self):
        with open(self.path("bad"), "wb") as f:
            f.write(b"\x05\x00")
        for ctx in (Fallback(), tempfile.TemporaryDirectory()):
            with ctx:
                with self.assertRaises(ValueError):
                    tensors.load(self.path("bad"))
                with self.assertRaises(ValueError):
                    tensors.save({"x": "not a tensor"}, self.path("x"))
                with self.assertRaises(ValueError):
                    tensors.save({"x": np.array([1 + 2j])}, self.path("x"))


class WithoutNumpy(unittest.TestCase):
    def test_tensor_objects_round_trip(self):
        with tempfile.TemporaryDirectory() as d, Fallback():
            saved = tensors._np
            tensors._np = None
            try:
                path = os.path.join(d, "m")
                tensors.save({"w": tensors.Tensor([2, 2], "F32", [1.0, 2.0, 3.0, 4.0])}, path)
                got = tensors.load(path)
            finally:
                tensors._np = saved
            self.assertEqual(got["w"].shape, [2, 2])
            self.assertEqual(list(got["w"].values), [1.0, 2.0, 3.0, 4.0])


if __name__ == "__main__":
    unittest.main()
