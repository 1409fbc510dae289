"""``fedlab node``: what a data owner runs to set up a node, register its datasets, start it, read its
audit log and see its privacy budgets (its training plans: ``cli_plans``).

Imports of the node's modules are inside the handlers, so that `fedlab --help` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

from fedlab.argtypes import positive_int, seconds
from fedlab.cli_format import DESCRIPTION_WIDTH, one_line, print_table, visible
from fedlab.cli_plans import add_plan_commands
from fedlab.errors import FedlabConfigError, FedlabError

if TYPE_CHECKING:
    from fedlab.node.config import NodeConfig
    from fedlab.node.registry import DatasetRegistry

__all__ = ["add_node_commands"]


def _split_tags(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``; the registry validates what is left."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _registry(directory: str) -> DatasetRegistry:
    """The registry of the node in ``directory`` (imports are lazy so `fedlab --help` stays fast)."""
    from fedlab.node.config import load_config
    from fedlab.node.registry import DatasetRegistry

    return DatasetRegistry(load_config(directory).db_path)


def _allowlist_line(config: NodeConfig) -> str:
    from fedlab.transport.keys import load_keypair

    if config.insecure or not config.secret_key_path.is_file():
        raise FedlabConfigError(
            f"node {config.name!r} in {config.directory} is insecure and has no key; create a node with "
            "`fedlab node init DIR --name NAME --researcher-key FILE` to get one"
        )
    key = load_keypair(config.secret_key_path)
    return f"{key.public} {' '.join(config.name.split())} ({config.node_id})"


def _print_allowlist_line(config: NodeConfig) -> None:
    line = _allowlist_line(config)
    print(f"node public key: {line.split()[0]}")
    print("the researcher must add this line to its allowlist file before the node can connect:")
    print(f"  {line}")


def _cmd_node_init(args: argparse.Namespace) -> int:
    from fedlab.node.config import init_node_dir

    if (args.researcher_key is None) == (not args.insecure):
        command = f"fedlab node init {shlex.quote(args.dir)} --name {shlex.quote(args.name)}"
        raise FedlabConfigError(
            "node init needs exactly one of --researcher-key FILE_OR_KEY (the researcher's public key from "
            "`fedlab keygen`: the node then talks only to that researcher, encrypted) or --insecure (no "
            f"encryption or authentication, for local demos only): `{command} --researcher-key researcher.key` "
            f"or `{command} --insecure`"
        )
    config = init_node_dir(args.dir, name=args.name, researcher=args.researcher, researcher_key=args.researcher_key)
    print(f"initialised node {config.name!r} with node id {config.node_id}")
    print(f"  directory:  {config.directory}")
    print(f"  config:     {config.config_path}")
    print(f"  registry:   {config.db_path}")
    print(f"  researcher: {config.researcher}")
    if config.insecure:
        print("WARNING: INSECURE node: no encryption and no authentication; anyone on the network can read its "
              "traffic or pose as the researcher. For local demos only.")
    else:
        print(f"  researcher key: {config.researcher_public_key}")
        print(f"  node key:   {config.public_key_path} (secret: {config.secret_key_path}, readable by you only)")
        _print_allowlist_line(config)
    print(
        f"next: fedlab node dataset add {shlex.quote(args.dir)} --name NAME --tags a,b --type csv --path FILE"
    )
    return 0


def _cmd_node_key(args: argparse.Namespace) -> int:
    from fedlab.node.config import load_config

    _print_allowlist_line(load_config(args.dir))
    return 0


def _cmd_dataset_add(args: argparse.Namespace) -> int:
    record = _registry(args.dir).add(
        name=args.name,
        tags=_split_tags(args.tags),
        data_type=args.data_type,
        path=args.path,
        description=args.description,
    )
    print(
        f"registered {record.data_type} dataset {record.name!r} as {record.dataset_id}: "
        f"{record.n_samples} samples, shape {record.shape}, tags {','.join(record.tags)}"
    )
    return 0


def _cmd_dataset_list(args: argparse.Namespace) -> int:
    records = _registry(args.dir).list()
    if not records:
        print("no datasets registered")
        return 0
    header = ("NAME", "ID", "TYPE", "TAGS", "SHAPE", "DESCRIPTION")
    rows = [
        (
            r.name,
            r.dataset_id,
            r.data_type,
            ",".join(r.tags),
            "x".join(map(str, r.shape)),
            one_line(r.description, DESCRIPTION_WIDTH),
        )
        for r in records
    ]
    print_table(header, rows)
    return 0


def _cmd_dataset_remove(args: argparse.Namespace) -> int:
    record = _registry(args.dir).remove(args.name)
    print(
        f"removed dataset {record.name!r} ({record.dataset_id}); its files at {record.path} were not touched"
    )
    return 0


def _cmd_node_start(args: argparse.Namespace) -> int:
    from fedlab.node.config import validate_researcher_address
    from fedlab.node.runtime import run_node

    if args.researcher is not None:
        validate_researcher_address(args.researcher)
    return int(run_node(args.dir, researcher=args.researcher, heartbeat_interval=args.heartbeat))


def _audit_line(entry: dict[str, object]) -> str:
    """One audit entry as one readable line: when, who, what, outcome (control characters escaped)."""
    if "unreadable" in entry:
        return visible(f"UNREADABLE LINE: {entry['unreadable']}")[0]
    asked = entry.get("asked") or {}
    what = " ".join(f"{k}={v}" for k, v in asked.items()) if isinstance(asked, dict) else str(asked)
    outcome = str(entry.get("outcome", "?"))
    if entry.get("code"):
        outcome += f" [{entry['code']}] {entry.get('message', '')}"
    who, kind = entry.get("sender") or "-", entry.get("msg_type") or "-"
    text = f"{entry.get('time', '?')}  {who}  {kind}  {what}  -> {outcome}"
    return visible(one_line(text, 400))[0]


def _cmd_node_audit(args: argparse.Namespace) -> int:
    from fedlab.node.audit import AUDIT_FILE, read_entries, verify
    from fedlab.node.config import load_config

    path = load_config(args.dir).directory / AUDIT_FILE
    if not path.exists():
        print(f"no audit log yet at {path}: the node writes it when it handles its first request")
        return 0
    if args.verify:
        result = verify(path)
        if not result.ok:
            raise FedlabError(f"audit log {path} is broken at line {result.broken_line} of {result.n_lines}: "
                              f"{result.reason}; the lines before it are intact")
        print(f"audit log {path}: {result.n_lines} entries, hash chain intact")
        return 0
    entries = list(read_entries(path))
    for entry in entries[-args.tail:] if args.tail else entries:
        print(_audit_line(entry))
    return 0


def _short_peer(peer: str) -> str:
    """A researcher as the ledger names it: its public key (first 12 characters) or ``insecure``."""
    return peer if peer == "insecure" or len(peer) <= 13 else peer[:12] + "…"


def _cmd_node_privacy(args: argparse.Namespace) -> int:
    from fedlab.node.config import load_config
    from fedlab.node.dp_ledger import DPLedger

    config = load_config(args.dir)
    rules = config.privacy
    ledger = DPLedger(config.db_path, rules)  # before printing: a missing node.db is the only output
    rows = ledger.rows()
    print(f"privacy rules ([privacy] in {config.config_path}): require_dp = {str(rules.require_dp).lower()}, "
          f"epsilon_budget = {rules.epsilon_budget:g}, delta = {rules.delta:g}")
    if rules.require_dp:
        print("  this node answers analytics and trains only with differential privacy")
    print(f"  each researcher may spend epsilon {rules.epsilon_budget:g} and delta {rules.delta:g} on each source "
          "dataset, over analytics and training together")
    for label, declared in (("clamp bounds", list(rules.bounds)), ("public categories", list(rules.categories))):
        if declared:
            print(f"  {label} declared for: {', '.join(visible(c)[0] for c in declared)}")
    if not rows:
        print("no differential-privacy spending recorded yet: no researcher has had a DP answer from this node")
        return 0
    header = ("RESEARCHER", "DATASET", "EPS SPENT", "EPS BUDGET", "EPS LEFT", "DELTA SPENT", "DELTA LEFT",
              "SPENDS", "LAST SPEND")
    table: list[tuple[str, ...]] = []
    exhausted = 0
    for r in rows:
        balance = ledger.balance(r.peer, r.source)
        exhausted += balance.epsilon_remaining <= 0
        table.append((visible(_short_peer(r.peer))[0], visible(r.dataset)[0], f"{r.epsilon_spent:.4g}",
                      f"{rules.epsilon_budget:g}", f"{balance.epsilon_remaining:.4g}", f"{r.delta_spent:.3g}",
                      f"{balance.delta_remaining:.3g}", str(r.n_spends), r.last))
    print_table(header, table)
    if exhausted:
        print(f"{exhausted} budget{'s are' if exhausted != 1 else ' is'} spent: the node refuses further DP "
              "requests there")
    return 0


def add_node_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="set up and run a node that holds datasets")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")

    init = node_sub.add_parser("init", help="make DIR a new node directory")
    init.add_argument("dir", metavar="DIR", help="node directory (created if needed)")
    init.add_argument("--name", required=True, help="a human-readable name for this node")
    init.add_argument(
        "--researcher", help="researcher address tcp://HOST:PORT (default tcp://127.0.0.1:5555)"
    )
    init.add_argument("--researcher-key", metavar="FILE_OR_KEY",
                      help="the researcher's public key: its NAME.key file from `fedlab keygen`, or the key itself; "
                      "the node then talks only to that researcher, encrypted")
    init.add_argument("--insecure", action="store_true",
                      help="no encryption and no authentication: for local demos only")
    init.set_defaults(handler=_cmd_node_init)

    key = node_sub.add_parser("key", help="print the node's public key and the researcher's allowlist line")
    key.add_argument("dir", metavar="DIR", help="node directory")
    key.set_defaults(handler=_cmd_node_key)

    start = node_sub.add_parser("start", help="run the node in DIR until interrupted")
    start.add_argument("dir", metavar="DIR", help="node directory")
    start.add_argument("--researcher", help="researcher address, overriding the config file")
    start.add_argument("--heartbeat", type=seconds, metavar="SECONDS", help="heartbeat interval")
    start.set_defaults(handler=_cmd_node_start)

    dataset = node_sub.add_parser("dataset", help="register, list and remove the node's datasets")
    ds_sub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="COMMAND")

    add = ds_sub.add_parser("add", help="inspect a dataset and register it")
    add.add_argument("dir", metavar="DIR", help="node directory")
    add.add_argument("--name", required=True, help="the name researchers will use for the dataset")
    add.add_argument("--tags", required=True, help="comma-separated tags, e.g. cancer,tabular")
    add.add_argument("--type", dest="data_type", required=True, choices=["csv", "images"])
    add.add_argument("--path", required=True, help="CSV file, or folder with one sub-folder per class")
    add.add_argument("--description", default="", help="free text shown to researchers")
    add.set_defaults(handler=_cmd_dataset_add)

    listing = ds_sub.add_parser("list", help="list the registered datasets")
    listing.add_argument("dir", metavar="DIR", help="node directory")
    listing.set_defaults(handler=_cmd_dataset_list)

    remove = ds_sub.add_parser("remove", help="unregister a dataset (its files are kept)")
    remove.add_argument("dir", metavar="DIR", help="node directory")
    remove.add_argument("name", metavar="NAME", help="dataset name or id")
    remove.set_defaults(handler=_cmd_dataset_remove)

    audit = node_sub.add_parser("audit", help="show or verify the node's log of requests and its answers")
    audit.add_argument("dir", metavar="DIR", help="node directory")
    audit.add_argument("--tail", type=positive_int, metavar="N", help="show only the last N entries")
    audit.add_argument("--verify", action="store_true",
                       help="check the hash chain; report the first edited, inserted or removed line")
    audit.set_defaults(handler=_cmd_node_audit)

    privacy = node_sub.add_parser(
        "privacy", help="show the differential-privacy budget each researcher spent and has left, per dataset")
    privacy.add_argument("dir", metavar="DIR", help="node directory")
    privacy.set_defaults(handler=_cmd_node_privacy)

    add_plan_commands(node_sub)
