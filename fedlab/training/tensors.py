"""Named arrays on the wire: ``NamedArray`` specs in the content, one raw buffer frame each.

Model parameters, Scaffold's control variates and optimizer state all travel as a mapping
from a name (``fc.weight``) to an array. Packing describes each array as the next buffer
frame without copying it; unpacking returns read-only views of the received frames, so a
node never copies a model it only reads. Numpy only: the researcher can pack parameters
without importing torch, and the conversion to tensors (which must copy read-only views)
lives with the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlab.errors import FedlabProtocolError
from fedlab.protocol.arrays import pack_array, unpack_array
from fedlab.training.messages import NamedArray

__all__ = ["pack_named", "unpack_named"]


def pack_named(
    arrays: Mapping[str, np.ndarray], first_buffer: int = 0
) -> tuple[list[NamedArray], list[memoryview]]:
    """Specs and frames for ``arrays``, in mapping order, numbered from ``first_buffer``.

    ``first_buffer`` lets several named groups (parameters, then each aggregator's
    auxiliary variables) share the buffer list of one message.
    """
    if first_buffer < 0:
        raise ValueError(f"first_buffer must be >= 0, not {first_buffer}")
    specs: list[NamedArray] = []
    frames: list[memoryview] = []
    for index, (name, array) in enumerate(arrays.items()):
        spec, frame = pack_array(np.asarray(array), first_buffer + index)
        specs.append(NamedArray(name=name, array=spec))
        frames.append(frame)
    return specs, frames


def unpack_named(specs: Sequence[NamedArray], buffers: Sequence[bytes | memoryview], *,
                 writable: bool = False) -> dict[str, np.ndarray]:
    """``{name: read-only view of its frame}``; a name sent twice is a protocol error.

    A duplicate would otherwise silently overwrite a parameter, so it is refused with the
    name it concerns. ``writable``: views of writable frames are left writable, for a receiver
    that owns the frames and lets the model work in them (the training worker).
    """
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in out:
            raise FedlabProtocolError(
                f"array name {spec.name!r} appears twice in the message; every named array must be unique",
                code="invalid_field",
                field="name",
            )
        array = out[spec.name] = unpack_array(spec.array, buffers)
        if writable and not memoryview(buffers[spec.array.buffer]).readonly:
            array.flags.writeable = True
    return out
