"""Masks: a 32-byte seed expanded to a stream of uint64 words, added to a vector modulo 2**64.

A mask must look uniformly random in the ring Z_(2**64) to whoever does not hold its seed, and
both ends of a pair must be able to expand the same seed to the same stream. AES-256-CTR keyed
by the seed (the nonce is all zeros: every seed keys exactly one stream, for one vector of one
session) gives both, at the speed of AES-NI.

Vectors are up to 400 MB (a model's parameters), so a mask is never materialised: the stream is
produced in :data:`CHUNK_BYTES` chunks into one reused buffer (``update_into``) and added to
the target chunk by chunk, so the extra memory is two 4 MiB buffers whatever the vector's size.

Throughput, measured once on the development machine (2 cores of an AMD EPYC with AES-NI,
cryptography 50, numpy 2.4): ``add_mask`` on a 200 MB uint64 vector (25M values) takes about
0.04 s, i.e. about 5 GB/s (600M values per second); AES-CTR alone is about 0.027 s of it. A
node with 10 peers masks a 200 MB model in under half a second.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlab.errors import FedlabSecaggError

__all__ = ["CHUNK_BYTES", "DOMAIN", "LEGACY_PRG", "PRG", "PRGS", "SEED_BYTES", "add_mask", "add_masks", "bind",
           "check_prg", "derive_seed", "mask_stream"]

DOMAIN = "fedlab-secagg v1"
SEED_BYTES = 32
CHUNK_BYTES = 256 << 10  # 256 KiB of stream at a time: the chunk and its stream stay in the cache
_WORD = 8
#: the mask generators: AES-CTR keyed by the whole seed (256 bits) or by its first 16 bytes (128 bits).
#: X25519 gives about 128 bits of security, so AES-128 weakens nothing and its 10 rounds are about 25%
#: faster than AES-256's 14. A session names its generator (``SecaggKeysRequest.prg``).
PRGS = {"aes-256-ctr": 32, "aes-128-ctr": 16}  # name: key bytes taken from the seed
PRG = "aes-128-ctr"  # what a researcher asks for now
LEGACY_PRG = "aes-256-ctr"  # a session whose request names none (an older researcher)
_ZERO_NONCE = bytes(16)
_ZEROS = bytes(CHUNK_BYTES)  # the plaintext: CTR's output on zeros is its keystream


def bind(*parts: str) -> bytes:
    """``parts`` as one unambiguous byte string (each UTF-8, prefixed by its length), for HKDF's
    ``info`` and AEAD's associated data: no two different lists of parts give the same bytes."""
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8")
        out += struct.pack(">I", len(raw))
        out += raw
    return bytes(out)


def derive_seed(shared_secret: bytes, session_id: str, purpose: str, a: str, b: str) -> bytes:
    """The 32-byte mask seed that nodes ``a`` and ``b`` both derive from their X25519 secret.

    The ids are bound in sorted order so that both ends get the same seed; the session id and the
    purpose are bound so that one key agreement never yields the same mask twice."""
    if not isinstance(shared_secret, bytes | bytearray) or len(shared_secret) != 32:
        raise FedlabSecaggError("a mask seed is derived from a 32-byte X25519 shared secret; got something else")
    first, second = sorted((a, b))
    info = bind(DOMAIN, purpose, session_id, first, second)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(bytes(shared_secret))


def check_prg(prg: object) -> str:
    """``prg`` if it is one of :data:`PRGS`, else a clear error."""
    if not isinstance(prg, str) or prg not in PRGS:
        raise FedlabSecaggError(f"unknown secure aggregation mask generator {prg!r}; this fedlab knows "
                                f"{sorted(PRGS)} (is the researcher or the node newer?)")
    return prg


def _encryptor(seed: bytes, first_block: int = 0, prg: str = LEGACY_PRG) -> CipherContext:
    """AES-CTR (``prg``) keyed by ``seed``, positioned at block ``first_block`` of the stream (CTR's counter is
    the whole 16-byte block, big-endian, starting from zero): a slice of a vector is masked with the
    same words as when the whole vector is."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise FedlabSecaggError(f"a mask seed is {SEED_BYTES} bytes of key; got {type(seed).__name__} "
                                f"of length {len(seed) if isinstance(seed, bytes | bytearray) else '?'}")
    key = bytes(seed[: PRGS[check_prg(prg)]])
    return Cipher(algorithms.AES(key), modes.CTR(first_block.to_bytes(16, "big"))).encryptor()


def _check_target(target: np.ndarray) -> None:
    if not isinstance(target, np.ndarray) or target.dtype != np.uint64 or target.ndim != 1:
        raise FedlabSecaggError("a mask is added to a 1-D uint64 array; encode the values into one first")
    if not target.flags.c_contiguous or not target.flags.writeable:
        raise FedlabSecaggError("a mask is added in place to a writeable C-contiguous array; pass a copy")


def _add_all(target: np.ndarray, masks: Sequence[tuple[bytes, int]], first_word: int, prg: str) -> None:
    """Every mask of ``masks`` added to ``target`` (a slice starting at word ``first_word``), chunk by chunk:
    each chunk of the target takes all the masks while it is in the cache, so the target is read and
    written once whatever the number of masks (mask by mask, it would cross memory once per mask)."""
    if first_word % 2:
        raise FedlabSecaggError(f"a mask slice starts at an even word (a whole AES block), not {first_word}")
    streams = []
    for seed, sign in masks:
        if sign not in (1, -1):
            raise FedlabSecaggError(f"a mask is added with sign +1 or -1, not {sign!r}")
        streams.append((_encryptor(seed, first_word * _WORD // 16, prg), np.add if sign == 1 else np.subtract))
    # block_size - 1 spare bytes: what update_into may ask for beyond the input's length
    buffer = bytearray(CHUNK_BYTES + 15)
    words = CHUNK_BYTES // _WORD
    zeros = memoryview(_ZEROS)
    stream = np.frombuffer(buffer, dtype="<u8", count=words)
    for start in range(0, target.size, words):
        stop = min(start + words, target.size)
        count = stop - start
        chunk = target[start:stop]
        for encryptor, op in streams:
            encryptor.update_into(zeros[: count * _WORD], buffer)
            op(chunk, stream[:count], out=chunk)


def add_mask(target: np.ndarray, seed: bytes, sign: int, *, first_word: int = 0, prg: str = LEGACY_PRG) -> None:
    """Add (``sign`` +1) or subtract (-1) the mask of ``seed`` to ``target`` in place, modulo 2**64.

    ``target`` is a 1-D C-contiguous uint64 array; the mask is AES-CTR(seed, zero nonce)'s
    keystream read as little-endian uint64, from word ``first_word`` on (even: a whole AES block), so
    that ``target`` may be a slice of the vector starting there. Extra memory: two :data:`CHUNK_BYTES`
    buffers."""
    _check_target(target)
    _add_all(target, [(seed, sign)], first_word, prg)


#: below this many words one thread masks the whole vector (threads cost more than they save)
PARALLEL_WORDS = 1 << 22


def add_masks(target: np.ndarray, masks: Sequence[tuple[bytes, int]], *, workers: int | None = None,
              prg: str = LEGACY_PRG) -> None:
    """:func:`add_mask` for every ``(seed, sign)`` of ``masks`` in one pass over ``target``, the vector
    cut into ``workers`` slices masked in parallel (AES and numpy release the GIL; default: one per
    core, at most 4, one for small vectors). The result is the same as adding the masks one by one."""
    _check_target(target)
    masks = list(masks)
    if workers is None:
        workers = 1 if target.size < PARALLEL_WORDS else max(1, min(4, os.cpu_count() or 1))
    if workers <= 1 or not masks:
        _add_all(target, masks, 0, prg)
        return
    step = -(-target.size // workers)
    step += step % 2  # slices start on whole AES blocks

    def part(start: int) -> None:
        _add_all(target[start:start + step], masks, start, prg)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="secagg-mask") as pool:
        list(pool.map(part, range(0, target.size, step)))


def mask_stream(seed: bytes, n: int, prg: str = LEGACY_PRG) -> np.ndarray:
    """The first ``n`` words of ``seed``'s mask as a new uint64 array (for tests and small vectors)."""
    if n < 0:
        raise FedlabSecaggError(f"a mask has a non-negative length, not {n}")
    out = np.zeros(n, dtype=np.uint64)
    add_mask(out, seed, 1, prg=prg)
    return out
