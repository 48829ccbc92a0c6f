"""A small CBOR (RFC 8949) encoder and decoder for the Client API messages.

Encodes: dict, list/tuple, str, bytes, int (64-bit range), float (always 64-bit), bool, None.
Decodes all major types with definite or indefinite lengths, half/single/double floats, and
skips tags. Anything else raises ``ValueError``.
"""

import struct

__all__ = ["dumps", "loads"]


def _head(major, n):
    if n < 24:
        return bytes([(major << 5) | n])
    if n < 0x100:
        return bytes([(major << 5) | 24, n])
    if n < 0x10000:
        return bytes([(major << 5) | 25]) + struct.pack(">H", n)
    if n < 0x100000000:
        return bytes([(major << 5) | 26]) + struct.pack(">I", n)
    if n < 0x10000000000000000:
        return bytes([(major << 5) | 27]) + struct.pack(">Q", n)
    raise ValueError("integer %d does not fit in 64 bits" % n)


def _encode(v, out):
    if v is None:
        out.append(b"\xf6")
    elif v is True:
        out.append(b"\xf5")
    elif v is False:
        out.append(b"\xf4")
    elif isinstance(v, int):
        out.append(_head(0, v) if v >= 0 else _head(1, -1 - v))
    elif isinstance(v, float):
        out.append(b"\xfb" + struct.pack(">d", v))
    elif isinstance(v, str):
        b = v.encode("utf-8")
        out.append(_head(3, len(b)))
        out.append(b)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        out.append(_head(2, len(b)))
        out.append(b)
    elif isinstance(v, (list, tuple)):
        out.append(_head(4, len(v)))
        for x in v:
            _encode(x, out)
    elif isinstance(v, dict):
        out.append(_head(5, len(v)))
        for k, x in v.items():
            _encode(k, out)
            _encode(x, out)
    else:
        raise ValueError("cannot encode %r as CBOR" % type(v).__name__)


def dumps(value):
    """The CBOR encoding of ``value``."""
    out = []
    _encode(value, out)
    return b"".join(out)


_BREAK = object()


class _Reader:
    def __init__(self, data):
        self.data = data
        self.at = 0

    def take(self, n):
        if self.at + n > len(self.data):
            raise ValueError("CBOR data is truncated")
        b = self.data[self.at:self.at + n]
        self.at += n
        return b

    def arg(self, ai):
        if ai < 24:
            return ai
        if ai == 24:
            return self.take(1)[0]
        if ai == 25:
            return struct.unpack(">H", self.take(2))[0]
        if ai == 26:
            return struct.unpack(">I", self.take(4))[0]
        if ai == 27:
            return struct.unpack(">Q", self.take(8))[0]
        raise ValueError("invalid CBOR additional information %d" % ai)

    def chunks(self, major):
        parts = []
        while True:
            v = self.item(allow_break=True)
            if v is _BREAK:
                return parts
            if major == 2 and not isinstance(v, bytes) or major == 3 and not isinstance(v, str):
                raise ValueError("bad chunk in an indefinite-length CBOR string")
            parts.append(v)

    def item(self, allow_break=False, depth=0):
        if depth > 64:
            raise ValueError("CBOR nesting is too deep")
        ib = self.take(1)[0]
        major, ai = ib >> 5, ib & 0x1F
        if major == 7:
            if ai == 20:
                return False
            if ai == 21:
                return True
            if ai in (22, 23):
                return None
            if ai == 25:
                return struct.unpack(">e", self.take(2))[0]
            if ai == 26:
                return struct.unpack(">f", self.take(4))[0]
            if ai == 27:
                return struct.unpack(">d", self.take(8))[0]
            if ai == 31 and allow_break:
                return _BREAK
            if ai < 24:
                return ai  # unassigned simple value
            raise ValueError("invalid CBOR simple value %d" % ai)
        if ai == 31:
            if major == 2:
                return b"".join(self.chunks(2))
            if major == 3:
                return "".join(self.chunks(3))
            if major == 4:
                out = []
                while True:
                    v = self.item(allow_break=True, depth=depth + 1)
                    if v is _BREAK:
                        return out
                    out.append(v)
            if major == 5:
                out = {}
                while True:
                    k = self.item(allow_break=True, depth=depth + 1)
                    if k is _BREAK:
                        return out
                    out[_key(k)] = self.item(depth=depth + 1)
            raise ValueError("indefinite length for CBOR major type %d" % major)
        n = self.arg(ai)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major == 2:
            return bytes(self.take(n))
        if major == 3:
            return bytes(self.take(n)).decode("utf-8")
        if major == 4:
            return [self.item(depth=depth + 1) for _ in range(n)]
        if major == 5:
            out = {}
            for _ in range(n):
                k = self.item(depth=depth + 1)
                out[_key(k)] = self.item(depth=depth + 1)
            return out
        # major 6: a tag; the tagged item stands for itself.
        return self.item(depth=depth + 1)


def _key(k):
    if isinstance(k, list):
        return tuple(k)
    if isinstance(k, dict):
        raise ValueError("a CBOR map cannot be a map key here")
    return k


def loads(data):
    """Decodes exactly one CBOR item from ``data``; trailing bytes are an error."""
    r = _Reader(bytes(data))
    try:
        v = r.item()
    except (struct.error, UnicodeDecodeError, RecursionError) as e:
        raise ValueError("invalid CBOR: %s" % e) from None
    if r.at != len(r.data):
        raise ValueError("%d bytes after the CBOR item" % (len(r.data) - r.at))
    return v
