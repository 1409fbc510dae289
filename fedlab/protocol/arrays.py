"""Arrays on the wire: (dtype, shape) in the content, the bytes in a raw buffer frame.

Only plain numeric dtypes cross the wire, so a peer can never make us build Python objects.
Unpacking is zero-copy: the array is a read-only view of the received frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedlab.errors import FedlabProtocolError
from fedlab.protocol.messages import ArraySpec

__all__ = ["ALLOWED_DTYPES", "pack_array", "unpack_array"]

ALLOWED_DTYPES = frozenset(
    np.dtype(name).str
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
)


def pack_array(array: np.ndarray, buffer_index: int) -> tuple[ArraySpec, memoryview]:
    """Describe ``array`` as frame number ``buffer_index``; returns the spec and its bytes."""
    arr = np.asarray(array)
    shape = list(arr.shape)  # ascontiguousarray would turn a 0-d array into shape [1]
    arr = np.ascontiguousarray(arr).reshape(-1)  # a flat view: memoryview.cast refuses 0 in a shape
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise FedlabProtocolError(
            f"arrays of dtype {arr.dtype} cannot be sent; use a numeric or bool dtype",
            code="invalid_field",
        )
    spec = ArraySpec(buffer=buffer_index, dtype=arr.dtype.str, shape=shape)
    return spec, arr.view(np.uint8).data if arr.size else memoryview(b"")


def unpack_array(spec: ArraySpec, buffers: Sequence[bytes | memoryview]) -> np.ndarray:
    """The array ``spec`` describes, checked against its buffer; raise if they disagree."""
    if spec.dtype not in ALLOWED_DTYPES:
        raise FedlabProtocolError(f"array dtype {spec.dtype!r} is not allowed", code="invalid_field",
                                  field="dtype")
    if spec.buffer >= len(buffers):
        raise FedlabProtocolError(
            f"array refers to buffer {spec.buffer} but the message has {len(buffers)} buffers",
            code="invalid_field", field="buffer",
        )
    dtype = np.dtype(spec.dtype)
    expected = math.prod(spec.shape) * dtype.itemsize
    buf = buffers[spec.buffer]
    if len(buf) != expected:
        raise FedlabProtocolError(
            f"array of shape {spec.shape} and dtype {spec.dtype} needs {expected} bytes, "
            f"its buffer has {len(buf)}",
            code="invalid_field", field="shape",
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(spec.shape)
    arr.flags.writeable = False
    return arr
