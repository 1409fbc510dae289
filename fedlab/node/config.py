"""A node's directory and its configuration file.

A node lives in one directory that holds everything it owns: ``config.toml`` (who the node
is, which researcher it talks to, whether training plans need the operator's approval and,
in its ``[disclosure]`` table, what analytics results may leave the node), ``node.db`` (the
dataset registry, training-plan approvals and training state), ``node.log`` and, unless the
node is ``insecure``, its CURVE key pair ``node.key`` / ``node.key_secret``: the researcher's
public key in the config and the node's own secret key are what make the node talk only to
that researcher, encrypted. The disclosure
rules come only from this file: nothing a researcher sends can change them.
This module creates such a directory (``fedlab node init``) and reads it back, turning every
way the file can be wrong into a :class:`FedlabConfigError` that says what to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import tomllib
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedlab.analytics.disclosure import RULE_HELP, DisclosureRules
from fedlab.errors import FedlabConfigError
from fedlab.privacy.dp_rules import DP_RULE_HELP, DPRules
from fedlab.training.device import check_device_setting
from fedlab.transport.keys import KEYPAIR_SUFFIX, PUBLIC_SUFFIX, create_keypair, is_public_key, read_public_key

__all__ = [
    "CONFIG_FILE",
    "DB_FILE",
    "DEFAULT_RESEARCHER",
    "LOG_FILE",
    "NODE_KEY_NAME",
    "NodeConfig",
    "init_node_dir",
    "load_config",
    "validate_researcher_address",
]

CONFIG_FILE = "config.toml"
DB_FILE = "node.db"
LOG_FILE = "node.log"
DEFAULT_RESEARCHER = "tcp://127.0.0.1:5555"
NODE_KEY_NAME = "node"  # DIR/node.key (public, goes in the researcher's allowlist), DIR/node.key_secret

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ADDRESS_RE = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class NodeConfig:
    """The settings of one node, as read from ``DIR/config.toml`` (``directory`` is DIR itself)."""

    node_id: str
    name: str
    researcher: str = DEFAULT_RESEARCHER
    heartbeat_interval: float = 1.0
    max_message_bytes: int = 256 * 1024 * 1024
    log_level: str = "INFO"
    require_approval: bool = True
    training_threads: int = 0
    device: str = "auto"
    researcher_public_key: str = ""
    insecure: bool = False
    bulk_transfer: bool = True  # an encrypted node's large messages may take the researcher's sealed bulk path
    training_timeout: float = 3600.0
    secure_aggregation: bool = True
    force_secure_aggregation: bool = False
    secure_aggregation_min_nodes: int = 2
    disclosure: DisclosureRules = field(default_factory=DisclosureRules)
    privacy: DPRules = field(default_factory=DPRules)
    directory: Path = field(kw_only=True)

    @property
    def db_path(self) -> Path:
        return self.directory / DB_FILE

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def public_key_path(self) -> Path:
        return self.directory / f"{NODE_KEY_NAME}{PUBLIC_SUFFIX}"

    @property
    def secret_key_path(self) -> Path:
        return self.directory / f"{NODE_KEY_NAME}{KEYPAIR_SUFFIX}"


# Keys of the file and the types they must have (``directory`` is not written in it).
_KEYS: dict[str, tuple[type, ...]] = {
    "node_id": (str,),
    "name": (str,),
    "researcher": (str,),
    "heartbeat_interval": (int, float),
    "max_message_bytes": (int,),
    "log_level": (str,),
    "require_approval": (bool,),
    "training_threads": (int,),
    "device": (str,),
    "researcher_public_key": (str,),
    "insecure": (bool,),
    "bulk_transfer": (bool,),
    "training_timeout": (int, float),
    "secure_aggregation": (bool,),
    "force_secure_aggregation": (bool,),
    "secure_aggregation_min_nodes": (int,),
    "disclosure": (dict,),
    "privacy": (dict,),
}
_REQUIRED = ("node_id", "name")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a table ([disclosure] or [privacy])"}
_COMMENTS = {
    "require_approval": [
        "# Training plans are code sent by a researcher. With true (the default), a plan runs only",
        "# after this node's operator approved its exact source (`fedlab node plan approve DIR PLAN_ID`);",
        "# with false, any plan runs except one the operator rejected (`fedlab node plan reject DIR PLAN_ID`).",
    ],
    "training_threads": [
        "# CPU threads torch may use for training (0: torch's default, one per core). Set it when",
        "# several nodes or other services share this machine: each would otherwise take every core.",
    ],
    "device": [
        "# Where training rounds run: \"auto\" (the default) trains on this machine's first CUDA GPU when the",
        "# researcher asks for one (training_args use_gpu=True) and torch sees one, else on the CPU; \"cpu\"",
        "# always trains on the CPU; \"cuda\" or \"cuda:N\" (N: 0 for the first GPU) always trains on that GPU,",
        "# asked or not, and fails rounds while torch sees no such GPU. A round that did not get the device it",
        "# asked for says why in its reply. See docs/gpu.md.",
    ],
    "researcher_public_key": [
        "# The researcher this node talks to, and only it: the node checks the researcher's CURVE public key",
        "# (from its `fedlab keygen`) and encrypts everything; the node's own key pair is node.key_secret.",
    ],
    "insecure": [
        "# INSECURE: no encryption and no authentication. Anyone on the network can read this node's",
        "# traffic or pose as the researcher. For local demos only, never for real data.",
    ],
    "training_timeout": [
        "# Seconds one training round may take. Plans run in a separate worker process; a round past",
        "# this limit is stopped (the worker is killed), the researcher is told why, and the node keeps serving.",
    ],
    "secure_aggregation": [
        "# Secure aggregation (secagg=True in the notebook): this node's figures leave it masked, and the",
        "# researcher learns only their sum over the nodes. true: take part when asked; false: refuse such requests.",
    ],
    "force_secure_aggregation": [
        "# true: answer analytics requests and training rounds ONLY under secure aggregation (a plain request",
        "# is refused with an error that says so). Preprocessing fits and validation-only rounds stay plain.",
    ],
    "secure_aggregation_min_nodes": [
        "# The fewest nodes a secure aggregation session may have for this node to take part (at least 2).",
    ],
}


def validate_researcher_address(address: str) -> str:
    """Return ``address`` if it looks like ``tcp://HOST:PORT``; raise FedlabConfigError otherwise."""
    match = _ADDRESS_RE.match(address) if isinstance(address, str) else None
    if match is None:
        raise FedlabConfigError(
            f"researcher address {address!r} is not of the form tcp://HOST:PORT (for example tcp://127.0.0.1:5555)"
        )
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise FedlabConfigError(f"researcher address {address!r} has port {port}; a port must be 1-65535")
    return address


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise FedlabConfigError("the node name must not be empty: pass --name NAME")
    if len(name) > 256:
        raise FedlabConfigError(f"the node name is {len(name)} characters long; at most 256 are allowed")
    return name.strip()


def _toml_value(value: object) -> str:
    """``value`` (bool, int, finite float, str or a sequence of str) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # json.dumps of a str is a TOML basic string, once characters outside the BMP (which json
    # would write as surrogate pairs, invalid in TOML) are kept literal and DEL is escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _render_toml(config: NodeConfig) -> str:
    lines = ["# fedlab node configuration, written by `fedlab node init`."]
    for f in fields(config):
        if f.name not in ("directory", "disclosure", "privacy"):
            if f.name in ("researcher_public_key", "insecure") and not getattr(config, f.name):
                continue  # only the mode in use is written
            if f.name == "bulk_transfer" and config.bulk_transfer:
                continue  # the default; `bulk_transfer = false` keeps every message on CURVE (docs/transport.md)
            lines += _COMMENTS.get(f.name, [])
            lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
    lines += [
        "",
        "# What analytics results may leave this node. Only this file sets these rules; a researcher",
        "# cannot change them. Edit a value and restart the node (`fedlab node start`) to apply it.",
        "[disclosure]",
    ]
    for f in fields(config.disclosure):
        lines.append(f"# {RULE_HELP[f.name]}")
        lines.append(f"{f.name} = {_toml_value(getattr(config.disclosure, f.name))}")
    lines += [
        "",
        "# Differential privacy: every DP answer (researcher.stats(..., epsilon=...), DP training) costs some",
        "# epsilon, and this node refuses a researcher once its budget on a dataset is spent. Restart to apply.",
        "[privacy]",
    ]
    for name in ("require_dp", "epsilon_budget", "delta"):
        lines += _wrap_comment(DP_RULE_HELP[name])
        lines.append(f"{name} = {_toml_value(getattr(config.privacy, name))}")
    lines += [
        "",
        "# Clamp bounds for DP sums, means, variances and quantiles, per column: they win over the researcher's.",
        "# Take them from what the column can hold (its units), never from the data. For example:",
        "# age = [0, 120]",
        "[privacy.bounds]",
        *(f"{_toml_value(c)} = [{lo!r}, {hi!r}]" for c, (lo, hi) in config.privacy.bounds.items()),
        "",
        "# Public levels for DP value counts and crosstabs, per column (from the codebook). For example:",
        '# sex = ["F", "M"]',
        "[privacy.categories]",
        *(f"{_toml_value(c)} = {_toml_value(list(v))}" for c, v in config.privacy.categories.items()),
    ]
    return "\n".join(lines) + "\n"


def _wrap_comment(text: str, width: int = 100) -> list[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _existing_node_id(config_path: Path) -> str:
    try:
        return str(tomllib.loads(config_path.read_text(encoding="utf-8")).get("node_id", "unknown"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "unknown"


def init_node_dir(directory: str | os.PathLike[str], name: str, researcher: str | None = None, *,
                  researcher_key: str | None = None) -> NodeConfig:
    """Make ``directory`` a node: write its config with a fresh node id and create its registry.

    ``researcher_key`` (the researcher's public key, as Z85 text or a ``NAME.key`` file) makes
    the node talk only to that researcher, encrypted, with a key pair of its own written as
    ``node.key`` / ``node.key_secret``. Without it the node is ``insecure``, for local demos, and
    its config says so.
    """
    from fedlab.node.registry import create_schema  # registry imports nothing from here

    name = _validate_name(name)
    researcher = validate_researcher_address(researcher if researcher is not None else DEFAULT_RESEARCHER)
    server_key = read_public_key(researcher_key) if researcher_key is not None else ""
    path = Path(directory).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise FedlabConfigError(f"{path} exists and is not a directory; pick a directory for the node")
    config_path = path / CONFIG_FILE
    if config_path.exists():
        raise FedlabConfigError(
            f"{path} is already a fedlab node (node id {_existing_node_id(config_path)}); "
            "use another directory or remove it"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedlabConfigError(f"cannot create node directory {path}: {exc.strerror or exc}") from exc
    config = NodeConfig(
        node_id="node-" + uuid.uuid4().hex[:12], name=name, researcher=researcher, directory=path,
        researcher_public_key=server_key, insecure=not server_key,
    )
    if server_key:
        create_keypair(path, NODE_KEY_NAME)  # refuses to replace a key pair left in the directory
    create_schema(config.db_path)
    try:
        _write_atomic(config_path, _render_toml(config))
    except OSError as exc:
        raise FedlabConfigError(f"cannot write {config_path}: {exc.strerror or exc}") from exc
    return config


def _check_types(data: dict[str, Any], config_path: Path) -> None:
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise FedlabConfigError(
            f"{config_path} has unknown key(s) {', '.join(unknown)}; allowed keys are {', '.join(_KEYS)}"
        )
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise FedlabConfigError(f"{config_path} is missing required key(s) {', '.join(missing)}")
    for key, value in data.items():
        types = _KEYS[key]
        # bool is an int subclass in Python; TOML true/false is never a valid number here.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise FedlabConfigError(
                f"{config_path}: {key} must be {_TYPE_NAMES[types[-1]]}, not {type(value).__name__} {value!r}"
            )


def load_config(directory: str | os.PathLike[str]) -> NodeConfig:
    """Read ``DIR/config.toml``; raise FedlabConfigError saying what is wrong if it is not valid."""
    path = Path(directory).expanduser().resolve()
    if not path.exists():
        raise FedlabConfigError(
            f"node directory {path} does not exist: run "
            "`fedlab node init DIR --name NAME --researcher-key FILE` first (or `--insecure` for a local demo)"
        )
    if not path.is_dir():
        raise FedlabConfigError(f"{path} is not a directory; pass the node directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FedlabConfigError(
            f"{path} is not a fedlab node directory: run "
            "`fedlab node init DIR --name NAME --researcher-key FILE` first (or `--insecure` for a local demo)"
        )
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FedlabConfigError(f"cannot read {config_path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FedlabConfigError(f"{config_path} is not UTF-8 text; fix or re-create it") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FedlabConfigError(f"{config_path} is not valid TOML ({exc}); fix or re-create it") from exc
    _check_types(data, config_path)
    try:
        disclosure = DisclosureRules.from_mapping(data.pop("disclosure", {}))
    except FedlabConfigError as exc:
        raise FedlabConfigError(f"{config_path}: {exc}") from None
    try:
        privacy = DPRules.from_mapping(data.pop("privacy", {}))
    except FedlabConfigError as exc:
        raise FedlabConfigError(f"{config_path}: {exc}") from None
    if not data["node_id"].strip():
        raise FedlabConfigError(f"{config_path}: node_id must not be empty")
    if not data["name"].strip():
        raise FedlabConfigError(f"{config_path}: name must not be empty")
    try:
        validate_researcher_address(data.get("researcher", DEFAULT_RESEARCHER))
    except FedlabConfigError as exc:
        raise FedlabConfigError(f"{config_path}: {exc}") from None
    heartbeat = float(data.get("heartbeat_interval", 1.0))
    if not (heartbeat > 0 and math.isfinite(heartbeat)):
        raise FedlabConfigError(
            f"{config_path}: heartbeat_interval must be a finite number of seconds > 0, not {heartbeat}"
        )
    if data.get("max_message_bytes", 1) <= 0:
        raise FedlabConfigError(f"{config_path}: max_message_bytes must be > 0")
    try:
        device = check_device_setting(data.get("device", "auto"))
    except FedlabConfigError as exc:
        raise FedlabConfigError(f"{config_path}: {exc}; set it to one of those (see docs/gpu.md)") from None
    if data.get("training_threads", 0) < 0:
        raise FedlabConfigError(
            f"{config_path}: training_threads must be 0 (torch's default) or a number of threads >= 1"
        )
    key = data.get("researcher_public_key", "")
    if key and not is_public_key(key):
        raise FedlabConfigError(
            f"{config_path}: researcher_public_key {key!r} is not a 40-character public key; copy it again "
            "from the researcher's NAME.key file"
        )
    if key and data.get("insecure", False):
        raise FedlabConfigError(
            f"{config_path} sets both researcher_public_key and insecure = true; remove the insecure line "
            "(keep the key) unless this is a local demo"
        )
    training_timeout = float(data.get("training_timeout", 3600.0))
    if not (training_timeout > 0 and math.isfinite(training_timeout)):
        raise FedlabConfigError(
            f"{config_path}: training_timeout must be a finite number of seconds > 0 (for example 3600), "
            f"not {training_timeout}"
        )
    if data.get("secure_aggregation_min_nodes", 2) < 2:
        raise FedlabConfigError(f"{config_path}: secure_aggregation_min_nodes must be 2 or more")
    if data.get("force_secure_aggregation", False) and not data.get("secure_aggregation", True):
        raise FedlabConfigError(
            f"{config_path} sets force_secure_aggregation = true and secure_aggregation = false: this node would "
            "answer nothing. Set secure_aggregation = true (or force_secure_aggregation = false)")
    log_level = data.get("log_level", "INFO").upper()
    if log_level not in _LOG_LEVELS:
        raise FedlabConfigError(
            f"{config_path}: log_level {data['log_level']!r} is not one of {', '.join(_LOG_LEVELS)}"
        )
    return NodeConfig(
        directory=path,
        disclosure=disclosure,
        privacy=privacy,
        **{**data, "heartbeat_interval": heartbeat, "training_timeout": training_timeout, "log_level": log_level,
           "device": device},
    )
