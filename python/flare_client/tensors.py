"""Safetensors files in pure Python, and a small tensor type for when numpy is absent.

A safetensors file is ``header_len: u64 little-endian``, a JSON header
``{name: {"dtype", "shape", "data_offsets": [start, end]}}`` (optionally ``__metadata__``),
then the raw little-endian tensor data.

:func:`load` gives tensors of one framework (see :data:`FRAMEWORKS`): ``"numpy"`` arrays,
``"pytorch"`` tensors (CPU, the file's dtype; made from the numpy arrays with
``torch.from_numpy``, which shares their memory, or straight from the file's bytes where numpy
is absent), or ``"raw"`` :class:`Tensor` objects holding an ``array.array``. By default,
numpy when it is importable (and ``FLARE_CLIENT_NO_NUMPY`` unset), else raw. :func:`save`
takes any of the three, whatever the framework. Supported dtypes: F32, F64, F16, I64, I32, U8,
BOOL; others (e.g. BF16) are refused with a clear error.

With numpy, files are read and written by the ``safetensors`` package when it is importable
(``pip install ./python[numpy]`` brings both): measured by ``scripts/python-formats-bench.py``,
it reads a model with one model of memory instead of two and writes it 2-3x faster, and it
writes flare-node's canonical layout (the safetensors crate's serializer, which flare-node
uses too), so the runtime never re-encodes a result. Without it the pure-Python code below does the same
job (names in sorted order, which the runtime re-encodes when dtypes are mixed).
"""

import array
import json
import os
import struct
import sys

try:
    if os.environ.get("FLARE_CLIENT_NO_NUMPY"):
        raise ImportError("disabled by FLARE_CLIENT_NO_NUMPY")
    import numpy as _np
except ImportError:
    _np = None

HAS_NUMPY = _np is not None
"""Whether params are numpy arrays (True) or :class:`Tensor` objects (False)."""

try:
    if _np is None or os.environ.get("FLARE_CLIENT_NO_SAFETENSORS"):
        raise ImportError("numpy absent, or disabled by FLARE_CLIENT_NO_SAFETENSORS")
    import safetensors.numpy as _st
except ImportError:
    _st = None

HAS_SAFETENSORS = _st is not None
"""Whether files go through the ``safetensors`` package (True) or the pure-Python code."""

# dtype -> (array typecode, numpy dtype, bytes per element)
_DTYPES = {
    "F32": ("f", "<f4", 4),
    "F64": ("d", "<f8", 8),
    "F16": ("f", "<f2", 2),  # widened to single precision in an array.array
    "I64": ("q", "<i8", 8),
    "I32": ("i", "<i4", 4),
    "U8": ("B", "u1", 1),
    "BOOL": ("B", "?", 1),
}
_NP_TO_ST = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32",
             "uint8": "U8", "bool": "BOOL"}
_MAX_HEADER = 100_000_000

FRAMEWORKS = ("pytorch", "numpy", "raw")
"""What :func:`load` can give: torch tensors, numpy arrays, or :class:`Tensor` objects."""


def detect_framework():
    """``"pytorch"`` when the process has imported torch already, else ``"numpy"`` when numpy
    is importable, else ``"raw"``. Torch is never imported here: a script that does not use it
    does not pay for it."""
    if "torch" in sys.modules:
        return "pytorch"
    return "numpy" if _np is not None else "raw"


def _default_framework():
    return "numpy" if _np is not None else "raw"


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("framework 'pytorch' needs torch: pip install './python[torch]'") from e
    return torch


# torch dtype name -> safetensors dtype
_TORCH_TO_ST = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32",
                "uint8": "U8", "bool": "BOOL"}
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


def _is_torch(t):
    """Whether ``t`` is a torch tensor (or quacks like one: ``detach``, ``cpu``, ``numpy``)."""
    return hasattr(t, "detach") and hasattr(t, "cpu") and hasattr(t, "numpy")


def _torch_cpu(name, t):
    """``t`` detached, on the CPU and contiguous (no copy when it already is), with its
    safetensors dtype; a dtype flare-node does not aggregate (e.g. bfloat16) is refused."""
    x = t.detach().cpu()
    dtype = getattr(x, "dtype", None)
    if dtype is not None and type(x).__module__.startswith("torch"):
        st = _TORCH_TO_ST.get(str(dtype).replace("torch.", ""))
        if st is None:
            raise ValueError("param %r has dtype %s, which flare-node does not aggregate (supported: %s)"
                             % (name, dtype, ", ".join("torch." + k for k in _TORCH_TO_ST)))
        x = x.contiguous()
    return x


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class Tensor:
    """A tensor without numpy: ``shape`` (list of ints), ``dtype`` (a safetensors dtype name)
    and ``values`` (a flat, row-major ``array.array``). Supports ``+ - * /`` with a number or
    a tensor of the same shape, so ``params[k] + 1.0`` works as it does for numpy arrays."""

    __slots__ = ("shape", "dtype", "values")

    def __init__(self, shape, dtype="F32", values=None):
        if dtype not in _DTYPES:
            raise ValueError("unsupported dtype %r" % dtype)
        self.shape = [int(d) for d in shape]
        self.dtype = dtype
        code = _DTYPES[dtype][0]
        if values is None:
            values = array.array(code, bytes(array.array(code).itemsize * _numel(self.shape)))
        elif not isinstance(values, array.array) or values.typecode != code:
            values = array.array(code, values)
        if len(values) != _numel(self.shape):
            raise ValueError("%d values for shape %s" % (len(values), self.shape))
        self.values = values

    def __len__(self):
        return self.shape[0] if self.shape else 1

    @property
    def size(self):
        """Number of elements."""
        return len(self.values)

    def tolist(self):
        """The values as a flat list."""
        return self.values.tolist()

    def copy(self):
        """An independent copy."""
        return Tensor(self.shape, self.dtype, array.array(self.values.typecode, self.values))

    def _zip(self, other, op):
        if isinstance(other, Tensor):
            if other.shape != self.shape:
                raise ValueError("shapes %s and %s differ" % (self.shape, other.shape))
            vals = [op(a, b) for a, b in zip(self.values, other.values)]
        else:
            vals = [op(a, other) for a in self.values]
        return Tensor(self.shape, self.dtype, vals)

    def __add__(self, o):
        return self._zip(o, lambda a, b: a + b)

    __radd__ = __add__

    def __sub__(self, o):
        return self._zip(o, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._zip(o, lambda a, b: b - a)

    def __mul__(self, o):
        return self._zip(o, lambda a, b: a * b)

    __rmul__ = __mul__

    def __truediv__(self, o):
        return self._zip(o, lambda a, b: a / b)

    def __eq__(self, o):
        return isinstance(o, Tensor) and (self.shape, self.dtype, self.values) == (o.shape, o.dtype, o.values)

    def __repr__(self):
        head = self.values[:6].tolist()
        more = ", ..." if len(self.values) > 6 else ""
        return "Tensor(shape=%s, dtype=%s, values=%s%s)" % (self.shape, self.dtype, str(head)[:-1], more + "]")


def _to_le(a):
    if sys.byteorder == "big":
        a = array.array(a.typecode, a)
        a.byteswap()
    return a


def _decode(dtype, shape, raw, as_numpy=True):
    if dtype not in _DTYPES:
        raise ValueError("tensor dtype %s is not supported by flare_client" % dtype)
    code, np_dtype, size = _DTYPES[dtype]
    if len(raw) != _numel(shape) * size:
        raise ValueError("tensor data length does not match its shape")
    if as_numpy and _np is not None:
        return _np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    if dtype == "F16":
        vals = array.array("f", struct.unpack("<%de" % _numel(shape), raw))
    else:
        vals = array.array(code)
        vals.frombytes(raw)
        vals = _to_le(vals)
    return Tensor(shape, dtype, vals)


def _encode(name, t):
    if isinstance(t, Tensor):
        if t.dtype == "F16":
            return "F16", list(t.shape), struct.pack("<%de" % len(t.values), *t.values)
        return t.dtype, list(t.shape), _to_le(t.values).tobytes()
    if _is_torch(t):
        x = _torch_cpu(name, t)
        if _np is not None or not type(x).__module__.startswith("torch"):
            return _encode(name, x.numpy())
        st = _TORCH_TO_ST[str(x.dtype).replace("torch.", "")]
        if sys.byteorder == "big":
            raise ValueError("writing torch tensors without numpy needs a little-endian host")
        if x.storage_offset() != 0 or x.untyped_storage().nbytes() != x.numel() * x.element_size():
            x = x.clone()  # a view into a larger storage: keep only its own bytes
        return st, list(x.shape), bytes(x.untyped_storage())
    if _np is not None and isinstance(t, (_np.ndarray, _np.generic)):
        a = _np.asarray(t)
        st = _NP_TO_ST.get(a.dtype.name)
        if st is None:
            raise ValueError("param %r has unsupported dtype %s" % (name, a.dtype))
        return st, list(a.shape), _np.ascontiguousarray(a, dtype=_DTYPES[st][1]).tobytes()
    raise ValueError("param %r is a %s, not a tensor" % (name, type(t).__name__))


def load(path, framework=None):
    """Reads a safetensors file into ``{name: tensor}``, the tensors of ``framework`` (one of
    :data:`FRAMEWORKS`; by default numpy when importable, else raw)."""
    framework = framework or _default_framework()
    if framework == "pytorch":
        return _load_torch(path)
    if framework == "numpy":
        if _np is None:
            raise ImportError("framework 'numpy' needs numpy: pip install './python[numpy]'")
        if _st is not None:
            return _load_with_safetensors(path)
    elif framework != "raw":
        raise ValueError("framework must be one of %s, not %r" % (", ".join(FRAMEWORKS), framework))
    data, header, base = _read(path)
    as_numpy = framework == "numpy"
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        out[name] = _decode(info["dtype"], info["shape"], data[base + s:base + e], as_numpy)
    return out


def _read(path):
    """The file's bytes, its parsed header and where its data starts."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError("%s: shorter than a safetensors header" % path)
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ValueError("%s: bad safetensors header length %d" % (path, n))
    header = json.loads(data[8:8 + n].decode("utf-8"))
    return data, header, 8 + n


def _load_torch(path):
    """The file as CPU torch tensors of its dtypes, without a copy beyond reading the file:
    through numpy (``torch.from_numpy`` shares the arrays' memory) when it is importable,
    else as views of one buffer holding the file."""
    torch = _torch()
    if _np is not None:
        return {name: torch.from_numpy(a) for name, a in load(path, "numpy").items()}
    if sys.byteorder == "big":
        raise ValueError("reading torch tensors without numpy needs a little-endian host")
    data, header, base = _read(path)
    buf = bytearray(data)
    del data
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
        if dtype not in _ST_TO_TORCH:
            raise ValueError("tensor %r has dtype %s, which flare_client does not support" % (name, dtype))
        tdtype = getattr(torch, _ST_TO_TORCH[dtype])
        s, e = info["data_offsets"]
        size = _DTYPES[dtype][2]
        n = _numel(shape)
        if e - s != n * size or base + e > len(buf):
            raise ValueError("tensor %r: data length does not match its shape" % name)
        if n == 0:
            out[name] = torch.empty(shape, dtype=tdtype)
        elif (base + s) % size:  # misaligned: a copy of its own
            out[name] = torch.frombuffer(bytearray(buf[base + s:base + e]), dtype=tdtype).reshape(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=tdtype, count=n, offset=base + s).reshape(shape)
    return out


def _as_array(name, t):
    """``t`` as a little-endian, contiguous numpy array of a supported dtype; no copy when it
    already is one."""
    if isinstance(t, Tensor):
        dtype, shape, raw = _encode(name, t)
        return _np.frombuffer(raw, dtype=_DTYPES[dtype][1]).reshape(shape)
    if _is_torch(t):
        t = _torch_cpu(name, t).numpy()  # shares the tensor's memory
    if not isinstance(t, (_np.ndarray, _np.generic)):
        raise ValueError("param %r is a %s, not a tensor" % (name, type(t).__name__))
    a = _np.asarray(t)
    st = _NP_TO_ST.get(a.dtype.name)
    if st is None:
        raise ValueError("param %r has unsupported dtype %s" % (name, a.dtype))
    a = _np.asarray(a, dtype=_DTYPES[st][1])  # ascontiguousarray would make a 0-d array 1-d
    return a if a.flags.c_contiguous else a.copy(order="C")


def _load_with_safetensors(path):
    try:
        params = _st.load_file(str(path))
    except Exception as e:  # the package raises its own error types for a bad file
        raise ValueError("%s: %s" % (path, e)) from e
    for name, a in params.items():
        if a.dtype.name not in _NP_TO_ST:
            raise ValueError("tensor %r has dtype %s, which flare_client does not support" % (name, a.dtype))
    return params


def save(params, path):
    """Writes ``{name: tensor}`` (numpy arrays, :class:`Tensor` objects or torch tensors) as a
    safetensors file, atomically (written aside, then renamed)."""
    tmp = str(path) + ".partial"
    if _st is not None:
        arrays = {name: _as_array(name, params[name]) for name in params}
        _st.save_file(arrays, tmp)
        os.replace(tmp, path)
        return
    header, blobs, at = {}, [], 0
    for name in sorted(params):
        dtype, shape, raw = _encode(name, params[name])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
