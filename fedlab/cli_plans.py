"""``fedlab node plan``: the operator reviews the training plans sent to the node, approves or rejects them.

A plan's source is shown with its invisible characters escaped (``cli_format.visible``): the
reviewer must see exactly the code that would run.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fedlab.cli_format import DESCRIPTION_WIDTH, one_line, print_table, visible

if TYPE_CHECKING:
    from fedlab.node.approvals import ApprovalRegistry, PlanRecord

__all__ = ["add_plan_commands"]


def _approvals(directory: str) -> tuple[ApprovalRegistry, bool]:
    """The plan approvals of the node in ``directory`` and whether it requires approval."""
    from fedlab.node.approvals import ApprovalRegistry
    from fedlab.node.config import load_config

    config = load_config(directory)
    return ApprovalRegistry(config.db_path), config.require_approval


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
         visible(r.researcher_id or "-")[0], visible(one_line(r.description, DESCRIPTION_WIDTH))[0])
        for r in records
    ]
    print_table(header, rows)
    return 0


def _cmd_plan_show(args: argparse.Namespace) -> int:
    approvals, _ = _approvals(args.dir)
    r = approvals.find(args.plan_id)
    for label, value in (
        ("plan id", r.plan_id), ("class", r.plan_class), ("status", r.status),
        ("requested", f"{r.requested_at} by {r.researcher_id or 'an unnamed researcher'}"),
        ("decided", r.decided_at or "-"), ("note", r.note or "-"), ("description", r.description.strip() or "-"),
    ):
        print(f"{label + ':':13}{visible(value, keep=chr(10))[0]}")
    source, hidden = visible(r.source, keep="\n\t")
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


def add_plan_commands(node_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
