"""Key files, the allowlist, keyed node configs and the CLI around them (no sockets to peers here)."""

from __future__ import annotations

import os
import socket
import stat
import tomllib
from pathlib import Path

import pytest
import zmq

from fedlab.cli import main
from fedlab.errors import FedlabConfigError
from fedlab.node.config import init_node_dir, load_config
from fedlab.node.runtime import node_keys
from fedlab.notebook.parsing import parse
from fedlab.researcher.researcher import Researcher, security
from fedlab.transport.curve import Throttle, node_refusal, researcher_refusal
from fedlab.transport.keys import (
    Allowlist,
    create_keypair,
    is_public_key,
    load_keypair,
    parse_allowlist,
    read_public_key,
)

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a well-formed key, from the zmq CURVE docs
KEY2 = zmq.curve_keypair()[0].decode()


# --- keys ---------------------------------------------------------------------------------------------


def test_is_public_key() -> None:
    assert is_public_key(KEY) and is_public_key(KEY2)
    for bad in ["", KEY[:-1], KEY + "x", KEY[:-1] + " ", KEY[:-1] + '"', "#" * 40, "\u00e9" * 40, "%%%%%" * 8]:
        assert not is_public_key(bad), bad


def test_create_keypair_writes_pyzmq_files_secret_private(tmp_path: Path) -> None:
    public, secret = create_keypair(tmp_path / "keys", "researcher")
    assert (public.name, secret.name) == ("researcher.key", "researcher.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(secret)
    pair = load_keypair(secret)
    assert (pair.public, pair.secret) == (pub.decode(), sec.decode())
    assert zmq.auth.load_certificate(public) == (pub, None)
    assert load_keypair(public) == pair  # NAME.key next to its secret finds the pair
    assert pair.secret not in repr(pair)
    assert sorted(p.name for p in public.parent.iterdir()) == ["researcher.key", "researcher.key_secret"]


def test_create_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    public, secret = create_keypair(tmp_path, "researcher")
    before = secret.read_bytes()
    with pytest.raises(FedlabConfigError, match="already exists; refusing to overwrite a key"):
        create_keypair(tmp_path, "researcher")
    secret.unlink()
    with pytest.raises(FedlabConfigError, match="researcher.key already exists"):
        create_keypair(tmp_path, "researcher")  # half a pair left is still a key someone may hold
    assert not secret.exists() and before


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_create_keypair_refuses_a_path_as_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(FedlabConfigError, match="is not a plain file name"):
        create_keypair(tmp_path, name)


def test_load_keypair_errors(tmp_path: Path) -> None:
    public, secret = create_keypair(tmp_path, "r")
    with pytest.raises(FedlabConfigError, match="does not exist; create a key pair with `fedlab keygen`"):
        load_keypair(tmp_path / "nope.key_secret")
    lonely = tmp_path / "lonely.key"
    lonely.write_bytes(public.read_bytes())
    with pytest.raises(FedlabConfigError, match="holds only a public key; pass the secret file"):
        load_keypair(lonely)
    junk = tmp_path / "junk.key_secret"
    junk.write_text("hello\n")
    with pytest.raises(FedlabConfigError, match="holds no public-key line"):
        load_keypair(junk)
    damaged = tmp_path / "damaged.key_secret"
    damaged.write_text(secret.read_text().replace('public-key = "', 'public-key = "x'))
    with pytest.raises(FedlabConfigError, match="not a 40-character Z85 key; the file is damaged"):
        load_keypair(damaged)


def test_load_keypair_warns_about_a_readable_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, secret = create_keypair(tmp_path, "r")
    os.chmod(secret, 0o644)
    load_keypair(secret)
    assert f"secret key file {secret} can be read by other users; run `chmod 600" in caplog.text


def test_read_public_key(tmp_path: Path) -> None:
    public, secret = create_keypair(tmp_path, "r")
    key = load_keypair(secret).public
    assert read_public_key(key) == key
    assert read_public_key(f"  {key}\n") == key
    assert read_public_key(str(public)) == key
    with pytest.raises(FedlabConfigError, match="is a secret key file; pass the public r.key file"):
        read_public_key(str(secret))
    with pytest.raises(FedlabConfigError, match="neither a 40-character public key nor an existing key file"):
        read_public_key("not-a-key")


# --- allowlist ----------------------------------------------------------------------------------------


def test_parse_allowlist() -> None:
    assert not is_public_key("#" + KEY[1:])  # '#' is a Z85 character, but never the first of a key
    text = f"""# nodes of the study
{KEY} hospital-a (node-0123456789ab)

   {KEY2}
#{KEY} commented out
# {KEY2} also out
{KEY2}\tsite c
"""
    assert parse_allowlist(text, "f") == {KEY: "hospital-a (node-0123456789ab)", KEY2: "site c"}
    assert parse_allowlist("", "f") == {}


@pytest.mark.parametrize(("line", "number"), [(KEY[:-1] + " short key", 2), ("hospital-a " + KEY, 2),
                                              (KEY + "x name", 2)])
def test_malformed_allowlist_line_is_named(line: str, number: int) -> None:
    with pytest.raises(FedlabConfigError, match=rf"^allow.txt line {number}: .* does not start with a 40-character "
                       r"public key; each line must be `PUBLIC_KEY \[name\]`"):
        parse_allowlist(f"{KEY} a\n{line}\n", "allow.txt")


def test_allowlist_file_rereads_changes_and_keeps_the_last_good_list(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"{KEY} a\n")
    allowlist = Allowlist(path)
    assert allowlist.name_of(KEY) == "a" and allowlist.name_of(KEY2) is None
    path.write_text(f"{KEY} a\n{KEY2} b, added later\n")
    os.utime(path, ns=(1, 1))  # a different stamp even on coarse clocks
    assert allowlist.name_of(KEY2) == "b, added later"
    path.write_text(f"{KEY} a\nbroken line\n")
    os.utime(path, ns=(2, 2))
    assert allowlist.name_of(KEY2) == "b, added later"
    assert "line 2: 'broken line' does not start with" in caplog.text
    assert "keeping the previous allowlist" in caplog.text


def test_allowlist_binds_keys_to_the_node_ids_in_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"{KEY} hospital a (node-aaa)\n{KEY2} site b, no id (Paris)\n")
    allowlist = Allowlist(path)
    assert allowlist.impersonation(KEY, "node-aaa") is None
    assert allowlist.impersonation(KEY, "node-bbb") == (
        f"key {KEY} is allowed as node node-aaa but claims to be node node-bbb")
    assert allowlist.impersonation(KEY2, "node-aaa") == (
        f"node node-aaa is bound to key {KEY} in the allowlist but connected with key {KEY2}")
    assert allowlist.impersonation(KEY2, "node-anything") is None  # an unbound key speaks as any other node


def test_allowlist_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="cannot read allowlist .*missing.txt.*one line `PUBLIC_KEY name`"):
        Allowlist(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("nope\n")
    with pytest.raises(FedlabConfigError, match="bad.txt line 1"):
        Allowlist(tmp_path / "bad.txt")


# --- the researcher's key and allowlist ------------------------------------------------------------------


def test_researcher_security_from_arguments_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = create_keypair(tmp_path, "researcher")
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{KEY} a\n")
    monkeypatch.delenv("FEDLAB_KEY", raising=False)
    monkeypatch.delenv("FEDLAB_ALLOWLIST", raising=False)
    assert security(None, None) == (None, None)
    with pytest.raises(FedlabConfigError, match="a researcher with a key needs an allowlist too"):
        security(secret, None)
    with pytest.raises(FedlabConfigError, match="a researcher with an allowlist needs a key too"):
        security(None, allow)
    monkeypatch.setenv("FEDLAB_KEY", str(secret))
    monkeypatch.setenv("FEDLAB_ALLOWLIST", str(allow))
    key, allowlist = security(None, None)
    assert key == load_keypair(secret) and allowlist is not None and allowlist.name_of(KEY) == "a"
    r = Researcher("tcp://127.0.0.1:1", start=False)
    assert r.public_key == key.public
    monkeypatch.setenv("FEDLAB_ALLOWLIST", "")
    with pytest.raises(FedlabConfigError, match="needs an allowlist too"):
        Researcher("tcp://127.0.0.1:1", start=False)


# --- node configs -------------------------------------------------------------------------------------------


def test_init_with_a_researcher_key_makes_a_keyed_node(tmp_path: Path) -> None:
    public, _ = create_keypair(tmp_path / "keys", "researcher")
    config = init_node_dir(tmp_path / "n", "site", researcher_key=str(public))
    researcher_key = read_public_key(str(public))
    assert (config.researcher_public_key, config.insecure) == (researcher_key, False)
    data = tomllib.loads(config.config_path.read_text())
    assert data["researcher_public_key"] == researcher_key and "insecure" not in data
    assert stat.S_IMODE(config.secret_key_path.stat().st_mode) == 0o600
    assert load_config(config.directory) == config
    keys = node_keys(config)
    assert keys is not None and keys.public == read_public_key(str(config.public_key_path))
    # the key text works as well as the file
    other = init_node_dir(tmp_path / "m", "site", researcher_key=researcher_key)
    assert other.researcher_public_key == researcher_key


def test_init_with_a_bad_researcher_key_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="neither a 40-character public key"):
        init_node_dir(tmp_path / "n", "site", researcher_key="oops")
    assert not (tmp_path / "n").exists()


def test_insecure_node_config_and_refusals(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "site")
    assert config.insecure and not config.researcher_public_key and node_keys(config) is None
    text = config.config_path.read_text()
    assert "insecure = true" in text and "local demos only" in text
    # neither a key nor insecure: a hand-written or old config cannot start
    config.config_path.write_text('node_id = "node-1"\nname = "n"\n')
    with pytest.raises(FedlabConfigError, match="has no researcher_public_key, so this node cannot know whom"):
        node_keys(load_config(config.directory))
    config.config_path.write_text(f'node_id = "node-1"\nname = "n"\nresearcher_public_key = "{KEY}"\n')
    with pytest.raises(FedlabConfigError, match="node.key_secret is missing: this node's secret key is gone"):
        node_keys(load_config(config.directory))
    config.config_path.write_text(f'node_id = "node-1"\nname = "n"\nresearcher_public_key = "{KEY}"\ninsecure = true\n')
    with pytest.raises(FedlabConfigError, match="sets both researcher_public_key and insecure = true"):
        load_config(config.directory)
    config.config_path.write_text('node_id = "node-1"\nname = "n"\nresearcher_public_key = "abc"\n')
    with pytest.raises(FedlabConfigError, match="researcher_public_key 'abc' is not a 40-character public key"):
        load_config(config.directory)


# --- the command line ----------------------------------------------------------------------------------------


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlab: error: ")
    for fragment in fragments:
        assert fragment in err[0]


def test_cli_keygen_init_and_node_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keygen", "--dir", str(keys)]) == 0
    out = capsys.readouterr().out
    researcher = load_keypair(keys / "researcher.key_secret")
    assert f"researcher public key: {researcher.public}" in out and "allowlist" in out and "FEDLAB_KEY" in out
    one_error(capsys, ["keygen", "--dir", str(keys)], "already exists; refusing to overwrite")

    node_dir = tmp_path / "site"
    assert main(["node", "init", str(node_dir), "--name", "Site A",
                 "--researcher-key", str(keys / "researcher.key")]) == 0
    out = capsys.readouterr().out
    config = load_config(node_dir)
    node_public = read_public_key(str(config.public_key_path))
    line = f"{node_public} Site A ({config.node_id})"
    assert line in out.splitlines()[-2] and "allowlist" in out and "INSECURE" not in out
    assert parse_allowlist(line, "f") == {node_public: f"Site A ({config.node_id})"}
    assert main(["node", "key", str(node_dir)]) == 0
    assert line in capsys.readouterr().out


def test_cli_init_needs_exactly_one_of_key_or_insecure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public, _ = create_keypair(tmp_path / "keys", "researcher")
    for extra in ([], ["--insecure", "--researcher-key", str(public)]):
        one_error(capsys, ["node", "init", str(tmp_path / "n"), "--name", "n", *extra],
                  "needs exactly one of --researcher-key", "--insecure")
    assert not (tmp_path / "n").exists()
    one_error(capsys, ["node", "init", str(tmp_path / "n"), "--name", "n", "--researcher-key", str(public) + "_secret"],
              "is a secret key file")
    assert main(["node", "init", str(tmp_path / "n"), "--name", "n", "--insecure"]) == 0
    assert "WARNING: INSECURE node" in capsys.readouterr().out
    one_error(capsys, ["node", "key", str(tmp_path / "n")], "is insecure and has no key")


def test_fed_connect_takes_key_and_allowlist() -> None:
    args = parse("connect tcp://0.0.0.0:5555 --key r.key_secret --allowlist allow.txt".split())
    assert (args.address, args.key, args.allowlist) == ("tcp://0.0.0.0:5555", "r.key_secret", "allow.txt")
    assert parse(["connect"]).key is None


def test_session_connect_passes_key_and_allowlist_and_keeps_them(tmp_path: Path) -> None:
    from fedlab.notebook.session import Session

    _, secret = create_keypair(tmp_path, "researcher")
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{KEY} a\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = Session(f"tcp://127.0.0.1:{port}")
    try:
        researcher = session.connect(key=str(secret), allowlist=str(allow), first_node_timeout=0.05)
        assert researcher.public_key == load_keypair(secret).public
        assert session.connect(first_node_timeout=0.05).public_key == researcher.public_key  # kept
    finally:
        session.close()


# --- refusal messages -------------------------------------------------------------------------------------------


def test_refusal_messages_name_the_cause() -> None:
    mismatch = int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
    crypto = int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
    failed_protocol, failed_auth = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH
    addr = "tcp://r:1"
    assert node_refusal(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0, addr, keyed=True) is None
    assert "not in the researcher's allowlist" in node_refusal(failed_auth, 400, addr, keyed=True)[1]
    assert "does not use encryption" in node_refusal(failed_protocol, mismatch, addr, keyed=True)[1]
    assert "this node is insecure" in node_refusal(failed_protocol, mismatch, addr, keyed=False)[1]
    assert "different key than config.toml's researcher_public_key (CURVE handshake failed: no detail)" in \
        node_refusal(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0, addr, keyed=True)[1]
    assert researcher_refusal(failed_auth, 400, keyed=True) is None  # the ZAP handler logged it with the address
    assert "could not be decrypted" in researcher_refusal(failed_protocol, crypto, keyed=True)[1]
    assert "connects without encryption" in researcher_refusal(failed_protocol, mismatch, keyed=True)[1]
    assert "started without a key" in researcher_refusal(failed_protocol, mismatch, keyed=False)[1]


def test_throttle() -> None:
    throttle = Throttle(period=3600)
    assert throttle.ready("a") and not throttle.ready("a") and throttle.ready("b")
    assert Throttle(period=0).ready("a") and Throttle(period=0).ready("a")
