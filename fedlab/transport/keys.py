"""CURVE keys and the researcher's allowlist: the files behind encrypted, authenticated links.

The files are pyzmq's own certificate format (``zmq.auth.create_certificates``): ``NAME.key``
holds a public key and may be handed to anyone; ``NAME.key_secret`` holds the key pair and
must stay with its owner, so it is created readable by its owner only (0600). Keys are kept
as their 40-character Z85 text, which is what zmq's socket options take and what people copy.

The allowlist is the researcher's list of nodes it accepts: one node per line,
``PUBLIC_KEY [name or comment]``; lines starting with ``#`` are comments. (Z85 has ``#`` in its
alphabet, but never as the first character of a 32-bit group, so no key starts with it.)
A ``(node-...)`` in the comment, as in the line ``fedlab node init`` prints, binds the key to
that node id: the key may then speak only as that node, and that node only with that key, so
one admitted node cannot pass itself off as another.
Every way a file can be wrong becomes a :class:`FedlabConfigError` naming the file, and the
line, and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from fedlab.errors import FedlabConfigError

__all__ = [
    "PUBLIC_SUFFIX",
    "KEYPAIR_SUFFIX",
    "Allowlist",
    "KeyPair",
    "create_keypair",
    "is_public_key",
    "load_keypair",
    "parse_allowlist",
    "read_public_key",
]

log = logging.getLogger("fedlab.transport")
PUBLIC_SUFFIX = ".key"
KEYPAIR_SUFFIX = ".key_secret"  # the secret file holds the whole pair
_KEY_LENGTH = 40  # Z85 text of a 32-byte curve25519 key
_BOUND_NODE = re.compile(r"\((node-[^\s()]+)\)")


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 text; ``source`` is the file it came from (for messages)."""

    public: str
    secret: str
    source: str = ""

    def __repr__(self) -> str:  # never print a secret key by accident
        return f"KeyPair(public={self.public!r}, source={self.source!r})"


def is_public_key(text: str) -> bool:
    """Whether ``text`` is a well-formed Z85 CURVE key (40 characters, canonical encoding)."""
    if not isinstance(text, str) or len(text) != _KEY_LENGTH:
        return False
    try:
        raw = z85.decode(text)
    except (ValueError, KeyError, struct.error):  # struct.error: a 5-character group past 2**32
        return False
    return len(raw) == 32 and z85.encode(raw).decode("ascii") == text


def create_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (0600); return both paths.

    Refuses to overwrite either file: a key pair replaced by mistake locks out every peer
    that was given the old public key. The files are written in a private temporary
    directory first, so the secret is never readable by others, not even for a moment.
    """
    if not name or any(sep in name for sep in ("/", "\\", os.sep)) or name in (".", ".."):
        raise FedlabConfigError(f"key name {name!r} is not a plain file name; pass e.g. --name researcher")
    target = Path(directory).expanduser().resolve()
    public, secret = target / f"{name}{PUBLIC_SUFFIX}", target / f"{name}{KEYPAIR_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise FedlabConfigError(
                f"{path} already exists; refusing to overwrite a key (peers that hold its public key would "
                "be locked out). Use another --dir or --name, or remove the old files yourself"
            )
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fedlab-keys-", dir=target))  # mode 0700
        try:
            made_public, made_secret = zmq.auth.create_certificates(staging, name)
            os.chmod(made_secret, stat.S_IRUSR | stat.S_IWUSR)
            os.chmod(made_public, 0o644)
            os.replace(made_secret, secret)
            os.replace(made_public, public)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise FedlabConfigError(f"cannot write a key pair in {target}: {exc.strerror or exc}") from exc
    return public, secret


def _load(path: Path) -> tuple[str, str | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:
        raise FedlabConfigError(f"{path} holds no public-key line; it is not a fedlab/zmq key file "
                                "(`fedlab keygen` writes them)") from None
    except OSError as exc:
        raise FedlabConfigError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    public_text = public.decode("ascii", "replace")
    secret_text = secret.decode("ascii", "replace") if secret else None
    for text, what in ((public_text, "public"), (secret_text, "secret")):
        if text is not None and not is_public_key(text):
            raise FedlabConfigError(f"{path}: the {what} key is not a 40-character Z85 key; the file is damaged")
    return public_text, secret_text


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair in ``path``: a ``NAME.key_secret`` file, or ``NAME.key`` next to its secret."""
    file = Path(path).expanduser()
    if file.suffix == PUBLIC_SUFFIX and file.with_suffix(KEYPAIR_SUFFIX).is_file():
        file = file.with_suffix(KEYPAIR_SUFFIX)
    if not file.is_file():
        raise FedlabConfigError(f"key file {file} does not exist; create a key pair with `fedlab keygen` "
                                "and pass its NAME.key_secret file")
    public, secret = _load(file)
    if secret is None:
        raise FedlabConfigError(f"{file} holds only a public key; pass the secret file "
                                f"({file.stem}{KEYPAIR_SUFFIX}) that `fedlab keygen` wrote next to it")
    if os.name == "posix" and file.stat().st_mode & 0o077:
        log.warning("secret key file %s can be read by other users; run `chmod 600 %s`", file, file)
    return KeyPair(public=public, secret=secret, source=str(file))


def read_public_key(file_or_key: str) -> str:
    """A public key given as its Z85 text or as the path of a ``NAME.key`` file."""
    text = file_or_key.strip()
    if is_public_key(text):
        return text
    file = Path(text).expanduser()
    if not file.is_file():
        raise FedlabConfigError(
            f"{file_or_key!r} is neither a 40-character public key nor an existing key file; pass the "
            "researcher's NAME.key file (from `fedlab keygen`) or the key it prints"
        )
    public, secret = _load(file)
    if secret is not None:
        raise FedlabConfigError(
            f"{file} is a secret key file; pass the public {file.stem}{PUBLIC_SUFFIX} file instead "
            "(a secret key must never leave its owner)"
        )
    return public


def parse_allowlist(text: str, source: str) -> dict[str, str]:
    """``{public key: name or comment}`` from an allowlist's text; ``source`` names it in errors."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split(None, 1)
        if not words:
            continue
        if words[0].startswith("#"):
            continue
        if is_public_key(words[0]):
            entries[words[0]] = words[1].strip() if len(words) > 1 else ""
        else:
            shown = line.strip() if len(line.strip()) <= 60 else line.strip()[:57] + "..."
            raise FedlabConfigError(
                f"{source} line {number}: {shown!r} does not start with a 40-character public key; each line "
                "must be `PUBLIC_KEY [name]` as printed by `fedlab node init` or `fedlab node key`, "
                "or a comment starting with #"
            )
    return entries


class Allowlist:
    """The node public keys a researcher accepts, read from a file and re-read when it changes.

    Re-reading lets a researcher admit a new node by adding its line, without restarting the
    notebook. If the edited file is malformed the previous list stays in force and the error
    is logged; the constructor, by contrast, raises it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self.entries: dict[str, str] = {}
        self._node_of: dict[str, str] = {}
        self._key_of: dict[str, str] = {}
        self._read(strict=True)

    def _read(self, *, strict: bool) -> None:
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp == self._stamp:
                return
            entries = parse_allowlist(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, FedlabConfigError) as exc:
            if isinstance(exc, FedlabConfigError):
                message = str(exc)
            elif isinstance(exc, UnicodeDecodeError):
                message = f"allowlist {self.path} is not UTF-8 text"
            else:
                message = (f"cannot read allowlist {self.path}: {exc.strerror or exc}; create it with one line "
                           "`PUBLIC_KEY name` per node you accept")
            if strict:
                raise FedlabConfigError(message) from None
            log.error("%s (keeping the previous allowlist of %d nodes)", message, len(self.entries))
            return
        self.entries, self._stamp = entries, stamp
        self._node_of = {key: m.group(1) for key, name in entries.items() if (m := _BOUND_NODE.search(name))}
        self._key_of = {node: key for key, node in self._node_of.items()}

    def name_of(self, key: str) -> str | None:
        """The name given to ``key``, or None if the key is not allowed (re-reads a changed file)."""
        with self._lock:
            self._read(strict=False)
            return self.entries.get(key)

    def impersonation(self, key: str, node_id: str) -> str | None:
        """Why a message from ``node_id``, sent over a connection authenticated with ``key``, must
        be dropped (the allowlist binds the key to another node, or the node to another key)."""
        with self._lock:
            bound_node, bound_key = self._node_of.get(key), self._key_of.get(node_id)
        if bound_node is not None and bound_node != node_id:
            return f"key {key} is allowed as node {bound_node} but claims to be node {node_id}"
        if bound_key is not None and bound_key != key:
            return f"node {node_id} is bound to key {bound_key} in the allowlist but connected with key {key}"
        return None

    def __len__(self) -> int:
        return len(self.entries)
