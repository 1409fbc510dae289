"""The ``fedlab`` command: make the researcher's key pair, set up a node, register its datasets,
decide which training plans may run on it, see what its privacy budgets have left, start it, run
the researcher service that notebooks share, or run the demo.

A data owner at a hospital uses this, not Python: every mistake they can make (a wrong
directory, a file that is not a CSV, a name already taken) ends as one ``fedlab: error:``
line that says what to do, with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedlab import __version__
from fedlab.argtypes import positive_int, seconds
from fedlab.errors import FedlabConfigError, FedlabError

if TYPE_CHECKING:
    from fedlab.node.approvals import ApprovalRegistry, PlanRecord
    from fedlab.node.config import NodeConfig
    from fedlab.node.registry import DatasetRegistry

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]
_DESCRIPTION_WIDTH = 40


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _split_tags(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``; the registry validates what is left."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _registry(directory: str) -> DatasetRegistry:
    """The registry of the node in ``directory`` (imports are lazy so `fedlab --help` stays fast)."""
    from fedlab.node.config import load_config
    from fedlab.node.registry import DatasetRegistry

    return DatasetRegistry(load_config(directory).db_path)


def _approvals(directory: str) -> tuple[ApprovalRegistry, bool]:
    """The plan approvals of the node in ``directory`` and whether it requires approval."""
    from fedlab.node.approvals import ApprovalRegistry
    from fedlab.node.config import load_config

    config = load_config(directory)
    return ApprovalRegistry(config.db_path), config.require_approval


def _cmd_keygen(args: argparse.Namespace) -> int:
    from fedlab.transport.keys import create_keypair, load_keypair

    public, secret = create_keypair(args.dir, args.name)
    key = load_keypair(secret)
    print(f"researcher public key: {key.public}")
    print(f"  public key file: {public}   (give it to the node operators)")
    print(f"  secret key file: {secret}   (readable by you only; never share it)")
    print("next:")
    print(f"  1. each node operator runs: fedlab node init DIR --name NAME --researcher tcp://HOST:PORT "
          f"--researcher-key {shlex.quote(public.name)}")
    print("  2. put the allowlist line each of them sends you in a file, e.g. allowlist.txt")
    print(f"  3. connect: fedlab.Researcher(ADDRESS, key={str(secret)!r}, allowlist='allowlist.txt'), or set")
    print(f"     FEDLAB_KEY={shlex.quote(str(secret))} and FEDLAB_ALLOWLIST=allowlist.txt for notebooks")
    return 0


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


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


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
            _one_line(r.description, _DESCRIPTION_WIDTH),
        )
        for r in records
    ]
    _print_table(header, rows)
    return 0


def _cmd_dataset_remove(args: argparse.Namespace) -> int:
    record = _registry(args.dir).remove(args.name)
    print(
        f"removed dataset {record.name!r} ({record.dataset_id}); its files at {record.path} were not touched"
    )
    return 0


_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _visible(text: str, keep: str = "") -> tuple[str, int]:
    """``text`` with control, format (bidi overrides) and unassigned characters shown as escapes, and
    how many there were: a plan's source must look to its reviewer exactly as Python will read it
    (no terminal escape sequences, no "Trojan Source" reordering)."""
    out, hidden = [], 0
    for char in text:
        if char not in keep and unicodedata.category(char) in _INVISIBLE:
            hidden += 1
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out), hidden


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _cmd_plan_list(args: argparse.Namespace) -> int:
    approvals, required = _approvals(args.dir)
    records = approvals.list()
    rule = "required" if required else "not required (require_approval = false): any plan not rejected runs"
    print(f"approval of training plans: {rule}")
    if not records:
        print("no training plans have been sent to this node")
        return 0
    header = ("ID", "STATUS", "CLASS", "REQUESTED", "DECIDED", "RESEARCHER", "DESCRIPTION")
    rows = [
        (r.short_id, r.status, r.plan_class, r.requested_at, r.decided_at or "-",
         _visible(r.researcher_id or "-")[0], _visible(_one_line(r.description, _DESCRIPTION_WIDTH))[0])
        for r in records
    ]
    _print_table(header, rows)
    return 0


def _cmd_plan_show(args: argparse.Namespace) -> int:
    approvals, _ = _approvals(args.dir)
    r = approvals.find(args.plan_id)
    for label, value in (
        ("plan id", r.plan_id), ("class", r.plan_class), ("status", r.status),
        ("requested", f"{r.requested_at} by {r.researcher_id or 'an unnamed researcher'}"),
        ("decided", r.decided_at or "-"), ("note", r.note or "-"), ("description", r.description.strip() or "-"),
    ):
        print(f"{label + ':':13}{_visible(value, keep=chr(10))[0]}")
    source, hidden = _visible(r.source, keep="\n\t")
    print(f"source ({len(r.source.splitlines())} lines):")
    if hidden:
        print(f"WARNING: the source contains {hidden} invisible or control characters, shown below as escapes "
              "(\\x.., \\u....); they can make code look different from what runs: ask the researcher why")
    print("-" * 72)
    print(source, end="" if source.endswith("\n") else "\n")
    print("-" * 72)
    return 0


def _decided(record: PlanRecord, verb: str) -> int:
    print(f"{verb} training plan {record.short_id} ({record.plan_class}); a running node applies this "
          f"to its next training request")
    print(f"  plan id: {record.plan_id}")
    return 0


def _cmd_plan_approve(args: argparse.Namespace) -> int:
    approvals, _ = _approvals(args.dir)
    return _decided(approvals.approve(args.plan_id, note=args.note), "approved")


def _cmd_plan_reject(args: argparse.Namespace) -> int:
    approvals, _ = _approvals(args.dir)
    return _decided(approvals.reject(args.plan_id, note=args.note), "rejected")


def _cmd_node_start(args: argparse.Namespace) -> int:
    from fedlab.node.config import validate_researcher_address
    from fedlab.node.runtime import run_node

    if args.researcher is not None:
        validate_researcher_address(args.researcher)
    return int(run_node(args.dir, researcher=args.researcher, heartbeat_interval=args.heartbeat))


def _audit_line(entry: dict[str, object]) -> str:
    """One audit entry as one readable line: when, who, what, outcome (control characters escaped)."""
    if "unreadable" in entry:
        return _visible(f"UNREADABLE LINE: {entry['unreadable']}")[0]
    asked = entry.get("asked") or {}
    what = " ".join(f"{k}={v}" for k, v in asked.items()) if isinstance(asked, dict) else str(asked)
    outcome = str(entry.get("outcome", "?"))
    if entry.get("code"):
        outcome += f" [{entry['code']}] {entry.get('message', '')}"
    who, kind = entry.get("sender") or "-", entry.get("msg_type") or "-"
    text = f"{entry.get('time', '?')}  {who}  {kind}  {what}  -> {outcome}"
    return _visible(_one_line(text, 400))[0]


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
            print(f"  {label} declared for: {', '.join(_visible(c)[0] for c in declared)}")
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
        table.append((_visible(_short_peer(r.peer))[0], _visible(r.dataset)[0], f"{r.epsilon_spent:.4g}",
                      f"{rules.epsilon_budget:g}", f"{balance.epsilon_remaining:.4g}", f"{r.delta_spent:.3g}",
                      f"{balance.delta_remaining:.3g}", str(r.n_spends), r.last))
    _print_table(header, table)
    if exhausted:
        print(f"{exhausted} budget{'s are' if exhausted != 1 else ' is'} spent: the node refuses further DP "
              "requests there")
    return 0


def _cmd_researcher_start(args: argparse.Namespace) -> int:
    from fedlab.node.config import validate_researcher_address

    validate_researcher_address(args.address)
    if args.detach:
        from fedlab.researcher.service_process import start_detached

        argv = ["researcher", "start", "--address", args.address]
        for flag, value in (("--key", args.key), ("--allowlist", args.allowlist), ("--heartbeat", args.heartbeat),
                            ("--log", args.log), ("--bulk", args.bulk)):
            if value is not None:
                argv += [flag, str(value)]
        info, log_file = start_detached(args.address, argv)
        print(f"researcher service for {info.address} running in the background (pid {info.pid}, log {log_file})")
        print(f"  notebooks attach with fedlab.Researcher({info.address!r}) or `%fed connect {info.address}`; "
              f"`fedlab researcher stop --address {info.address}` stops it")
        return 0
    from fedlab.researcher.service_process import run_service

    return run_service(args.address, key=args.key, allowlist=args.allowlist,
                       heartbeat_interval=args.heartbeat or 1.0, log_file=args.log,
                       bulk=args.bulk)


def _cmd_researcher_status(args: argparse.Namespace) -> int:
    import time

    from fedlab.researcher.service_process import format_status, service_status

    deadline = time.monotonic() + (args.wait or 0.0)
    while True:
        replies = service_status(args.address)
        if replies or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not replies:
        where = f"for {args.address}" if args.address else "for you on this machine"
        waited = f" (waited {args.wait:g} s)" if args.wait else ""
        print(f"no researcher service runs {where}{waited}; start one with `fedlab researcher start`")
        return 1
    for reply in replies:
        print("\n".join(format_status(reply)))
    return 0


def _cmd_researcher_stop(args: argparse.Namespace) -> int:
    from fedlab.researcher.service_process import stop_service

    info = stop_service(args.address)
    print(f"stopped the researcher service for {info.address} (pid {info.pid}); its nodes keep knocking until a "
          "researcher binds the address again")
    return 0


def _add_researcher_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    researcher = sub.add_parser("researcher", help="run the researcher service that this user's notebooks share")
    r_sub = researcher.add_subparsers(dest="researcher_command", required=True, metavar="COMMAND")
    start = r_sub.add_parser(
        "start", help="hold the nodes' socket, keys and connections for every notebook of this user",
        description="Bind ADDRESS for the nodes and let the notebook kernels of this user on this machine attach "
        "(fedlab.Researcher(ADDRESS) and %%fed connect do, when it runs). Runs in the foreground until Ctrl-C, "
        "unless --detach.")
    start.add_argument("--address", default="tcp://127.0.0.1:5555",
                       help="the address the nodes dial (default tcp://127.0.0.1:5555, this machine only; "
                       "tcp://0.0.0.0:5555 for nodes elsewhere, with --key and --allowlist)")
    start.add_argument("--key", metavar="FILE", help="the researcher's NAME.key_secret from `fedlab keygen` "
                       "(default $FEDLAB_KEY); without a key and an allowlist the service is insecure")
    start.add_argument("--allowlist", metavar="FILE", help="the node public keys it accepts, one per line "
                       "(default $FEDLAB_ALLOWLIST)")
    start.add_argument("--heartbeat", type=seconds, metavar="SECONDS", help="heartbeat interval (default 1)")
    start.add_argument("--log", metavar="FILE", help="also log to FILE")
    start.add_argument("--bulk", metavar="SETTING",
                       help="the encrypted service's bulk path for large messages: on (the control port + 1), off "
                       "(all over CURVE) or tcp://HOST:PORT (default $FEDLAB_BULK, else on); it is every attached "
                       "notebook's")
    start.add_argument("--detach", action="store_true",
                       help="run in the background; return once it listens (log in the run directory)")
    start.set_defaults(handler=_cmd_researcher_start)
    status = r_sub.add_parser("status", help="the running service: attached kernels, nodes, requests in flight")
    status.add_argument("--address", help="the service of this address's port (default: every running one)")
    status.add_argument("--wait", type=seconds, metavar="SECONDS", help="wait this long for a service to run")
    status.set_defaults(handler=_cmd_researcher_status)
    stop = r_sub.add_parser("stop", help="stop the service (its kernels get an error; nodes keep knocking)")
    stop.add_argument("--address", help="the service of this address's port (default: the only one running)")
    stop.set_defaults(handler=_cmd_researcher_stop)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedlab.demo import run_demo

    return int(run_demo(n_nodes=args.nodes, directory=args.dir, port=args.port, lab=not args.no_lab,
                        browser=not args.no_browser, lab_port=args.lab_port, notebooks=args.notebooks))


def _add_node_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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

    _add_plan_commands(node_sub)


def _add_plan_commands(node_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = node_sub.add_parser("plan", help="review, approve and reject the training plans sent to the node")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")
    plan_id_help = "the plan's id, or a unique prefix of at least 8 characters (see `plan list`)"

    listing = plan_sub.add_parser("list", help="list the training plans sent to this node and their status")
    listing.add_argument("dir", metavar="DIR", help="node directory")
    listing.set_defaults(handler=_cmd_plan_list)

    show = plan_sub.add_parser("show", help="show a plan's details and its full source code")
    show.add_argument("dir", metavar="DIR", help="node directory")
    show.add_argument("plan_id", metavar="PLAN_ID", help=plan_id_help)
    show.set_defaults(handler=_cmd_plan_show)

    for verb, handler, what in (
        ("approve", _cmd_plan_approve, "allow a plan to run on this node (read its source first: `plan show`)"),
        ("reject", _cmd_plan_reject, "refuse a plan (also when the node does not require approval)"),
    ):
        cmd = plan_sub.add_parser(verb, help=what)
        cmd.add_argument("dir", metavar="DIR", help="node directory")
        cmd.add_argument("plan_id", metavar="PLAN_ID", help=plan_id_help)
        cmd.add_argument("--note", default="", help="why (kept with the decision, shown to the researcher)")
        cmd.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedlab`` command."""
    parser = argparse.ArgumentParser(
        prog="fedlab", description="Federated analytics over data that never leaves its node."
    )
    parser.add_argument("--version", action="version", version=f"fedlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = sub.add_parser("keygen", help="make the researcher's key pair (NAME.key public, NAME.key_secret)")
    keygen.add_argument("--dir", default=".", help="where to write the key files (default: here)")
    keygen.add_argument("--name", default="researcher", help="file name of the key pair (default researcher)")
    keygen.set_defaults(handler=_cmd_keygen)
    _add_node_commands(sub)
    _add_researcher_commands(sub)

    demo = sub.add_parser(
        "demo", help="start local nodes holding public medical data and open JupyterLab on the quickstart",
        description="Create one node directory per site (breast cancer, diabetes and digit images from "
        "scikit-learn, split unevenly), start the nodes and open JupyterLab on notebooks/01_quickstart.ipynb. "
        "Ctrl-C stops everything it started.")
    demo.add_argument("--nodes", type=positive_int, default=3, help="how many nodes to start (default 3, at most 8)")
    demo.add_argument("--dir", type=Path, default=None,
                      help="where to put the node directories (default ./demo-federation; recreated on each run)")
    demo.add_argument("--port", type=_port, default=5555,
                      help="the port the notebook's researcher binds and the nodes dial (default 5555)")
    demo.add_argument("--no-lab", action="store_true",
                      help="start only the nodes and print how to connect to them (Ctrl-C stops them)")
    demo.add_argument("--no-browser", action="store_true",
                      help="start JupyterLab without opening a browser; it prints the URL to open")
    demo.add_argument("--lab-port", type=_port, default=8888, help="JupyterLab's port (default 8888)")
    demo.add_argument("--notebooks", type=Path, default=None,
                      help="the notebooks directory JupyterLab serves (default: this checkout's notebooks/)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedlab`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FedlabError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fedlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
