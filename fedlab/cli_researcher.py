"""``fedlab keygen`` and ``fedlab researcher``: the researcher's key pair, and the researcher service
that this user's notebooks share (start, status, stop; ``fedlab.researcher.service_process``)."""

from __future__ import annotations

import argparse
import shlex

from fedlab.argtypes import seconds

__all__ = ["add_keygen_command", "add_researcher_commands"]


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


def add_researcher_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def add_keygen_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = sub.add_parser("keygen", help="make the researcher's key pair (NAME.key public, NAME.key_secret)")
    keygen.add_argument("--dir", default=".", help="where to write the key files (default: here)")
    keygen.add_argument("--name", default="researcher", help="file name of the key pair (default researcher)")
    keygen.set_defaults(handler=_cmd_keygen)
