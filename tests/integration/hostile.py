"""Hostile multi-frame messages for the fuzz tests, from a seeded generator (reproducible).

Each generator call returns one message as a list of frames. The mix covers what a broken or
malicious peer could send: random bytes, truncated and bit-flipped envelope frames, headers
with a wrong type in each field, unknown types and versions, msgpack declaring huge lengths it
does not carry, hostile nesting depth, too many frames, messages over the size limit, and
well-formed headers carrying junk or one wrong field in otherwise valid content.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import msgspec

from fedlab.protocol import PROTOCOL_VERSION, encode, make_envelope
from fedlab.protocol.messages import MESSAGE_TYPES, Message

Frames = list[bytes]
_HEADER_FIELDS = ("msg_id", "msg_type", "sender", "version", "time", "parent_id")
_ids = itertools.count()


def junk_value(rng: random.Random, depth: int = 0) -> Any:
    """A value of a random type: the wrong one for almost any field."""
    kind = rng.randrange(16 if depth < 3 else 10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-1000, 1000)
    if kind == 3:
        return rng.choice([2**63 - 1, -(2**63), 2**64 - 1, 0, -1])
    if kind == 4:
        return rng.choice([float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 5e-324])
    if kind == 5:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 32), 0x202E, 0x1F600,
                                       rng.randrange(0x4E00, 0x9FFF)])) for _ in range(rng.randrange(0, 40)))
    if kind == 6:
        return "x" * rng.choice([129, 257, 1025, 70000])
    if kind == 7:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 8:
        return ""
    if kind == 9:
        return rng.choice(["mean", "count", "histogram", "quantiles", "value_counts", "corr", "crosstab",
                           "mean radius", "target", "no-such-column"])
    if kind == 10:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    if kind == 11:
        return {str(junk_value(rng, depth + 1))[:40]: junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}
    if kind == 12:
        return {}
    if kind == 13:
        return list(range(rng.choice([1000, 20000])))
    if kind == 14:
        return {"histogram": {"edges": junk_value(rng, depth + 1), "bins": junk_value(rng, depth + 1)},
                "value_counts": {"dropna": junk_value(rng, depth + 1)}}
    return [[[[junk_value(rng, depth + 1)]]]]


def pack(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def header_dict(msg_type: str, *, msg_id: str | None = None, sender: str = "hostile",
                parent_id: str | None = None, version: str = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"msg_id": msg_id or f"h-{next(_ids):08d}", "msg_type": msg_type, "sender": sender,
            "version": version, "time": 1.7e9, "parent_id": parent_id}  # fixed: the same bytes every run


def header_frame(msg_type: str, **kw: Any) -> bytes:
    return pack(header_dict(msg_type, **kw))


def huge_declared(rng: random.Random) -> bytes:
    """msgpack values that declare far more than they carry (bin32, str32, array32, map32)."""
    return rng.choice([b"\xc6\xff\xff\xff\xff" + b"abc", b"\xdb\xff\xff\xff\xff" + b"abc",
                          b"\xdd\xff\xff\xff\xff" + b"\xc0", b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0",
                          b"\xde\xff\xff", b"\xdc\xff\xff\xc0"])


def deep(depth: int) -> bytes:
    """A value nested ``depth`` arrays deep (msgpack fixarray of one), in depth + 1 bytes."""
    return b"\x91" * depth + b"\xc0"


class Hostile:
    """Seeded source of hostile messages.

    ``templates`` maps message types to valid content dicts; mutations of those reach the
    handlers (and, for replies, the researcher's request matching). ``max_bytes`` is the
    receiver's ``max_message_bytes``; ``parents`` returns msg_ids worth forging replies to;
    ``costly`` types only appear with one field mutated, never as the base of other kinds.
    """

    def __init__(self, seed: int, templates: dict[str, dict[str, Any]], *, max_bytes: int,
                 parents: Callable[[], list[str]] = list, sender: str = "hostile",
                 costly: frozenset[str] = frozenset()) -> None:
        self.rng = random.Random(seed)
        self.templates = templates
        # types whose handler takes long (a preprocessing fit writes state): mutated, not repeated
        self.base_types = sorted(set(templates) - costly)
        self.max_bytes = max_bytes
        self.parents = parents
        self.sender = sender
        self.kinds: list[Callable[[], Frames]] = [
            self.random_frames, self.empty_or_one, self.truncated, self.bit_flipped, self.wrong_header_field,
            self.unknown_type, self.wrong_version, self.huge_declared_sizes, self.nesting, self.too_many_frames,
            self.oversize, self.junk_content, self.wrong_content_field, self.extra_buffers, self.forged_reply,
            self.wrong_content_field, self.junk_content,
        ]

    def __call__(self) -> Frames:
        return self.rng.choice(self.kinds)()

    # -- the kinds -----------------------------------------------------------------------------
    def _valid(self) -> Frames:
        msg_type = self.rng.choice(self.base_types)
        return [header_frame(msg_type, sender=self.sender), pack(self.templates[msg_type])]

    def random_frames(self) -> Frames:
        return [self.rng.randbytes(self.rng.randrange(0, 300)) for _ in range(self.rng.randrange(1, 6))]

    def empty_or_one(self) -> Frames:
        return self.rng.choice([[b""], [b"", b""], [self._valid()[0]], [b"\xc0"], [b"\x80", b"\x80"]])

    def truncated(self) -> Frames:
        frames = self._valid()
        i = self.rng.randrange(2)
        frames[i] = frames[i][: self.rng.randrange(len(frames[i]))]
        return frames

    def bit_flipped(self) -> Frames:
        frames = self._valid()
        i = self.rng.randrange(2)
        data = bytearray(frames[i])
        for _ in range(self.rng.randrange(1, 4)):
            if data:
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        frames[i] = bytes(data)
        return frames

    def wrong_header_field(self) -> Frames:
        frames = self._valid()
        header = msgspec.msgpack.decode(frames[0])
        field = self.rng.choice((*_HEADER_FIELDS, "extra"))
        if self.rng.random() < 0.2:
            header.pop(field, None)
        else:
            header[field] = junk_value(self.rng)
        frames[0] = pack(header) if self.rng.random() < 0.9 else pack([header])
        return frames

    def unknown_type(self) -> Frames:
        name = self.rng.choice(["format_disk", "", "x" * 200, "heartbeat ", "PING_REQUEST", "error_reply",
                                "training_plan_approve_reply"])
        return [pack({**header_dict("ping_request", sender=self.sender), "msg_type": name}),
                pack(junk_value(self.rng))]

    def wrong_version(self) -> Frames:
        version = self.rng.choice(["9.0", "0.1", "", "1", "one.two", "1." + "9" * 40, "-1.0"])
        return [header_frame("ping_request", version=version, sender=self.sender), pack({})]

    def huge_declared_sizes(self) -> Frames:
        frames = self._valid()
        frames[self.rng.randrange(2)] = huge_declared(self.rng)
        return frames

    def nesting(self) -> Frames:
        frames = self._valid()
        depth = self.rng.choice([50, 900, 1100, 5000, 100000])
        if self.rng.random() < 0.5:  # deep value inside otherwise valid content (an Any-typed field)
            content = self.templates[msgspec.msgpack.decode(frames[0])["msg_type"]]
            key = self.rng.choice(sorted(content) or ["x"])
            frames[1] = b"\x81" + pack(key) + deep(depth)
        else:
            frames[self.rng.randrange(2)] = deep(depth)
        return frames

    def too_many_frames(self) -> Frames:
        count = 20000 if self.rng.random() < 0.03 else self.rng.choice([100, 1000, 5000])  # limit: 16384
        return [*self._valid(), *[b""] * count]

    def oversize(self) -> Frames:
        """Over ``max_bytes`` in total but no frame over the socket's per-frame backstop."""
        frames = self._valid()
        chunk = self.max_bytes // 2 + 1
        return [*frames, b"\0" * chunk, b"\1" * chunk]

    def junk_content(self) -> Frames:
        frames = self._valid()
        frames[1] = pack(junk_value(self.rng)) if self.rng.random() < 0.7 else self.rng.randbytes(40)
        return frames

    def wrong_content_field(self) -> Frames:
        """Valid content with one field replaced, removed or added: reaches the handler when the type allows."""
        msg_type = self.rng.choice(sorted(self.templates))
        content = dict(self.templates[msg_type])
        fields = list(msgspec.structs.fields(MESSAGE_TYPES[msg_type])) if msg_type in MESSAGE_TYPES else []
        names = [f.name for f in fields] or ["x"]
        name = self.rng.choice(names)
        roll = self.rng.random()
        if roll < 0.1:
            content.pop(name, None)
        elif roll < 0.2:
            content["unexpected"] = junk_value(self.rng)
        else:
            content[name] = junk_value(self.rng)
        try:
            body = pack(content)
        except (TypeError, msgspec.EncodeError):
            body = pack({})
        parents = self.parents()
        parent = self.rng.choice(parents) if parents and self.rng.random() < 0.3 else None
        return [header_frame(msg_type, sender=self.sender, parent_id=parent), body]

    def extra_buffers(self) -> Frames:
        """Buffers no content describes, or fewer than an array spec names."""
        frames = self._valid()
        return [*frames, *[self.rng.randbytes(self.rng.randrange(0, 2000)) for _ in range(self.rng.randrange(1, 9))]]

    def forged_reply(self) -> Frames:
        """A well-formed reply type answering a pending request (or none) with junk or an error."""
        parents = self.parents() or [None]
        parent = self.rng.choice([*parents, None, "no-such-request"])
        msg_type = self.rng.choice(["ping_reply", "error_reply", "fa_reply", "dataset_search_reply",
                                    "train_progress", "train_reply", "heartbeat", "bye"])
        if msg_type == "error_reply" and self.rng.random() < 0.5:
            body = pack({"code": "x", "message": junk_value(self.rng) if self.rng.random() < 0.5 else "forged"})
        else:
            body = pack(junk_value(self.rng))
        return [header_frame(msg_type, sender=self.sender, parent_id=parent), body]


def envelope_frames(content: Message, sender: str, **kw: Any) -> Frames:
    return [bytes(f) for f in encode(make_envelope(content, sender, **kw))]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")
