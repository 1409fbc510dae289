"""``fedlab.Researcher(bulk=...)``: checked at once, passed to the transport, the environment when left out.

The researchers are built with ``start=False``: nothing binds, the setting is what is checked
(tests/integration/test_bulk_option.py runs it with real encrypted nodes).
"""

from __future__ import annotations

import logging

import pytest

from fedlab import Researcher
from fedlab.errors import FedlabConfigError
from fedlab.researcher.researcher import check_bulk
from fedlab.transport.keys import create_keypair

ADDRESS = "tcp://127.0.0.1:47310"


@pytest.fixture
def keys(tmp_path, monkeypatch):
    for name in ("FEDLAB_KEY", "FEDLAB_ALLOWLIST", "FEDLAB_BULK"):
        monkeypatch.delenv(name, raising=False)
    _, secret = create_keypair(tmp_path, "researcher")
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("# no node yet\n", encoding="utf-8")
    return {"key": secret, "allowlist": allowlist}


@pytest.mark.parametrize("good", [None, True, False, "on", "OFF", " off ", "tcp://127.0.0.1:6000", "tcp://*:6000"])
def test_bulk_settings_are_accepted(good):
    check_bulk(good)


@pytest.mark.parametrize("bad", ["sometimes", "tcp://127.0.0.1", "ipc:///tmp/x", "", 5556, 1.0, ["on"]])
def test_a_bad_setting_is_refused_saying_what_is_accepted(bad, keys):
    with pytest.raises(FedlabConfigError, match=r"is not a bulk setting: give True .*tcp://HOST:PORT"):
        Researcher(ADDRESS, service="own", start=False, bulk=bad, **keys)


def test_the_argument_reaches_the_transport(keys, monkeypatch):
    monkeypatch.setenv("FEDLAB_BULK", "off")  # the argument wins over the environment
    r = Researcher(ADDRESS, service="own", start=False, bulk="tcp://127.0.0.1:47999", **keys)
    assert r._transport.bulk is not None and r._transport.bulk.port == 47999
    on = Researcher(ADDRESS, service="own", start=False, bulk=True, **keys)
    assert on._transport.bulk.port == 47311  # the control port + 1
    assert Researcher(ADDRESS, service="own", start=False, bulk=False, **keys)._transport.bulk is None


@pytest.mark.parametrize(("env", "port"), [(None, 47311), ("off", None), ("tcp://127.0.0.1:47888", 47888)])
def test_left_out_it_is_the_environment_as_before(keys, monkeypatch, env, port):
    if env is not None:
        monkeypatch.setenv("FEDLAB_BULK", env)
    bulk = Researcher(ADDRESS, service="own", start=False, **keys)._transport.bulk
    assert (bulk.port if bulk is not None else None) == port


def test_an_insecure_researcher_says_bulk_has_no_effect(monkeypatch, caplog):
    for name in ("FEDLAB_KEY", "FEDLAB_ALLOWLIST"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.WARNING, logger="fedlab")
    Researcher(ADDRESS, service="own", start=False, bulk=True)
    assert any("bulk=True has no effect" in m for m in caplog.messages), caplog.messages
    caplog.clear()
    Researcher(ADDRESS, service="own", start=False, bulk="off")
    assert not any("has no effect" in m for m in caplog.messages), caplog.messages
