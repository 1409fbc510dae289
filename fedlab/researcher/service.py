"""Attach to the researcher service, or bind in the kernel: what ``Researcher(address, service=...)`` does.

A researcher service (``fedlab researcher start``) is found by the port of the address (its
service file in the user's run directory, see ``fedlab.transport.service_files``). Modes:

* ``"auto"`` (the default): attach when a live service holds the address's port, else bind
  the address in this process, as a researcher always did;
* ``"attach"``: attach, or raise saying how to start a service;
* ``"own"``: bind in this process (an error if a service holds the port).

``$FEDLAB_SERVICE`` gives the mode when ``service=`` is left out, so notebooks run unchanged.
Attached, the service's key and allowlist are the ones in force. A kernel that names a key or an
allowlist (argument or ``$FEDLAB_KEY``/``$FEDLAB_ALLOWLIST``) attaches only to a service using
the same ones, so asking for encryption never ends on an insecure or differently keyed service.
The bulk path is the service's too: it listens where the service was told (``fedlab researcher
start --bulk``, else its ``$FEDLAB_BULK``), so a kernel's ``bulk=`` is not applied when it attaches,
and a warning says so and how to change it; the transfer still works, on the service's setting.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedlab.errors import FedlabConfigError, FedlabError
from fedlab.transport.keys import load_keypair
from fedlab.transport.service_client import ServiceClientTransport
from fedlab.transport.service_files import ServiceInfo, find_service

__all__ = ["MODES", "SERVICE_ENV", "attach_transport", "bind_hint", "check_compatible", "service_mode"]

log = logging.getLogger("fedlab.researcher")
SERVICE_ENV = "FEDLAB_SERVICE"
MODES = ("auto", "attach", "own")
_KEY_ENV, _ALLOWLIST_ENV = "FEDLAB_KEY", "FEDLAB_ALLOWLIST"


def service_mode(mode: str | None) -> str:
    """``mode``, else ``$FEDLAB_SERVICE``, else ``"auto"``; raise on anything but the three modes."""
    chosen = mode if mode is not None else (os.environ.get(SERVICE_ENV) or "auto")
    if chosen not in MODES:
        where = "service=" if mode is not None else f"${SERVICE_ENV}"
        raise FedlabConfigError(f"{where} is {chosen!r}; it must be one of {', '.join(map(repr, MODES))}: auto "
                                "attaches to a running researcher service or binds here, attach only attaches, "
                                "own only binds here")
    return chosen


def _label() -> str:
    """How `fedlab researcher status` names this kernel: the notebook Jupyter says it runs, else the program."""
    return os.environ.get("JPY_SESSION_NAME") or Path(sys.argv[0] or "python").name


def attach_transport(address: str, mode: str | None, key: str | os.PathLike[str] | None,
                     allowlist: str | os.PathLike[str] | None, *,
                     bulk: bool | str | None = None) -> ServiceClientTransport | None:
    """The transport through the service for ``address``, or None where this process should bind it.

    ``bulk`` is the kernel's own bulk setting (None when left to the environment); attached, the
    service's is in force, and one given here is logged as not applied."""
    chosen = service_mode(mode)
    if chosen == "own":
        return None
    try:
        info = find_service(address)
    except FedlabError as exc:
        if chosen == "attach":
            raise
        log.warning("not looking for a researcher service (%s); binding %s here", exc, address)
        return None
    if info is None:
        if chosen == "attach":
            raise FedlabConfigError(
                f"no researcher service runs for {address} on this machine (service='attach'); start one with "
                f"`fedlab researcher start --address {address}`, or use service='auto' to bind the address here")
        return None
    check_compatible(info, key, allowlist)
    if info.public_key is None:
        log.warning("INSECURE: the researcher service for %s (pid %d) runs without a key: no encryption and no "
                    "authentication of its nodes. For local demos only", info.address, info.pid)
    if bulk is not None:
        log.warning("bulk=%r is not applied: this researcher attaches to the researcher service for %s (pid %d), "
                    "whose bulk setting is in force (its --bulk, else its $FEDLAB_BULK). To change it, stop the "
                    "service (`fedlab researcher stop --address %s`) and start it with `fedlab researcher start "
                    "--bulk SETTING`, or pass service='own' with no service running", bulk, info.address, info.pid,
                    info.address)
    log.info("attaching to the researcher service for %s (pid %d)", info.address, info.pid)
    return ServiceClientTransport(info, label=_label())


def check_compatible(info: ServiceInfo, key: str | os.PathLike[str] | None,
                     allowlist: str | os.PathLike[str] | None) -> None:
    """Raise when this kernel names a key or an allowlist the service does not use."""
    key = key if key is not None else (os.environ.get(_KEY_ENV) or None)
    allowlist = allowlist if allowlist is not None else (os.environ.get(_ALLOWLIST_ENV) or None)
    other = (f"stop it (`fedlab researcher stop --address {info.address}`) and start it with the key and allowlist "
             "you want, or use another port")
    if key is not None:
        wanted = load_keypair(key).public
        if info.public_key is None:
            raise FedlabConfigError(f"the researcher service for {info.address} (pid {info.pid}) runs without a key "
                                    f"(insecure), but this researcher was given the key {key}: {other}")
        if info.public_key != wanted:
            raise FedlabConfigError(f"the researcher service for {info.address} (pid {info.pid}) uses the public key "
                                    f"{info.public_key}, not {wanted} from {key}: {other}")
    if allowlist is not None:
        wanted_list = str(Path(allowlist).expanduser().resolve())
        if info.allowlist != wanted_list:
            used = info.allowlist or "no allowlist (insecure)"
            raise FedlabConfigError(f"the researcher service for {info.address} (pid {info.pid}) admits the nodes of "
                                    f"{used}, not of {wanted_list}: {other}")


def bind_hint(address: str) -> str:
    """What to do when binding ``address`` failed because a researcher service holds it ("" otherwise)."""
    try:
        info = find_service(address, settle=0.0)
    except FedlabError:
        return ""
    if info is None:
        return ""
    return (f"A researcher service (pid {info.pid}) holds {info.address}: attach to it with service='auto' (the "
            f"default) or 'attach' (in a notebook, `%fed connect` with ${SERVICE_ENV} unset), or stop it with "
            f"`fedlab researcher stop --address {info.address}`.")
