"""The ike role's shipped configuration and its operator guide agree with the code.

* ``etc/remote-access.toml`` loads through the real config loader and means what its
  comments say (XAUTH policy, the pool it names exists, the example passwords, NAT-T and
  the esp role's ports fit together); its commented-out certificate policy is valid too.
* ``etc/narsuite.toml`` (the embedded default) has an ``[ike]`` section showing defaults.
* ``docs/roles/ike.md`` documents every ``[ike]`` and ``[[ike.peers]]`` key -- no more, no
  less -- with the code's defaults, every counter and every narctl command, and its
  strongSwan client examples are the lab's (``narsuite.lab.strongswan.ikev1_client_conf``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path

import attrs
import bcrypt
import pytest

from narsuite import config as cfgmod
from narsuite.ike import engine
from narsuite.ike.config import DEFAULT_PROPOSALS, IkeConfig, PeerPolicy, parse_esp, parse_phase1
from narsuite.ike.role import ROLE
from narsuite.lab.strongswan import ikev1_client_conf
from narsuite.passwords import check_hash_format

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "remote-access.toml"
DEFAULT = ROOT / "etc" / "narsuite.toml"
GUIDE = ROOT / "docs" / "roles" / "ike.md"


@pytest.fixture(scope="module")
def example() -> cfgmod.Config:
    return cfgmod.load(EXAMPLE)


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text()


def _policy(cfg: cfgmod.Config, name: str) -> PeerPolicy:
    (p,) = [p for p in cfg.role("ike").peers if p.name == name]
    return p


# ------------------------------------------------------------------ etc/remote-access.toml
def test_remote_access_example_loads_with_both_roles(example):
    ike = example.role("ike")
    esp = example.role("esp")
    assert isinstance(ike, IkeConfig)
    assert example.source == EXAMPLE
    # the ports the two roles share
    assert ike.natt_port == esp.port == 4500
    assert ike.port == 500
    # the 004 draft's ESP arrives on UDP 500: the esp role must listen there when we offer it
    if "espthrunat" in ike.natt:
        assert esp.draft_port == ike.port
    assert not esp.peers, "peers come from IKE, not from [[esp.peers]]"


def test_remote_access_policy_is_psk_xauth_mode_config(example):
    ike = example.role("ike")
    assert [p.name for p in ike.peers] == ["rw", "rw2"]
    rw = _policy(example, "rw")
    assert rw.auth == "psk" and rw.secret and rw.xauth
    assert rw.aggressive is False  # the file says Main Mode only
    assert rw.mode == "tunnel" and not rw.modecfg_push
    assert rw.remote == ("0.0.0.0/0",) and rw.id == "%any" and rw.local_id == "gw.example"
    # the pool it names exists, and G's inner address is kept out of it
    assert rw.pool in example.store.pools
    pool = example.store.pools[rw.pool]
    assert pool.network == ipaddress.IPv4Network("10.8.0.0/24")
    assert ipaddress.IPv4Address("10.8.0.1") in pool.exclude
    # what the clients get lies inside what they may reach
    local = [ipaddress.IPv4Network(n) for n in rw.local_ts]
    for net in rw.split_include:
        assert any(ipaddress.IPv4Network(net).subnet_of(n) for n in local), net
    for dns in rw.dns:
        assert any(ipaddress.IPv4Address(dns) in n for n in local), dns
    assert not pool.network.overlaps(local[0])
    for p in rw.proposals:
        parse_phase1(p)
    for e in rw.esp:
        parse_esp(e)


def test_remote_access_users_and_their_documented_passwords(example):
    ike = example.role("ike")
    assert set(ike.users) == {"alice", "bob"}
    text = EXAMPLE.read_text()
    for user, hashed in ike.users.items():
        check_hash_format(hashed)
        # "# change-me-<user>" beside each hash: the comment tells the truth
        password = re.search(rf'^{user} = "[^"]+"\s+#\s*(\S+)', text, re.M).group(1)
        assert password == f"change-me-{user}"
        assert bcrypt.checkpw(password.encode(), hashed.encode())
        assert hashed.startswith("$2b$04$"), "example hashes are made with a low cost on purpose"
    assert "REPLACE" in text and "narctl hash-password" in text


def test_remote_access_anti_dos_and_dpd_settings(example):
    ike = example.role("ike")
    assert ike.dpd_delay == 30 and ike.dpd_timeout == 120
    assert (ike.half_open_per_source, ike.half_open_total, ike.half_open_timeout) == (16, 2048, 30)


def _uncomment_certificates(text: str) -> str:
    """The file with its commented certificate settings and policy switched on."""
    out = []
    in_cert_block = False
    for line in text.splitlines():
        if line == "# [[ike.peers]]":
            in_cert_block = True
            line = line[2:]
        elif re.match(r"# (certificate|private_key|cacerts) = ", line):
            line = line[2:]
        elif in_cert_block and re.match(r"# [a-z_]+ = ", line):
            line = line[2:]
        out.append(line)
    assert in_cert_block, "the commented certificate policy is gone"
    return "\n".join(out) + "\n"


def test_remote_access_commented_certificate_and_eap_policies_are_valid(tmp_path):
    text = _uncomment_certificates(EXAMPLE.read_text())
    # certificate/private_key/cacerts sit in [ike] (before [ike.users]): elsewhere the loader refuses them
    cfg = cfgmod.loads(text, base=tmp_path)
    ike = cfg.role("ike")
    assert ike.certificate is not None and ike.private_key is not None and ike.cacerts
    certs = _policy(cfg, "certs")
    assert certs.auth == "rsa" and certs.local_id == "%cert" and not certs.secret
    assert certs.pool in cfg.store.pools and not certs.aggressive
    # the commented IKEv2 EAP policy (it needs the certificate too) comes on with it
    assert [p.name for p in ike.peers] == ["rw", "rw2", "eap", "certs"]
    eap = _policy(cfg, "eap")
    assert eap.auth == "eap-mschapv2" and eap.versions == (2,) and eap.local_id == "%cert"


# ------------------------------------------------------------------ etc/narsuite.toml
def test_embedded_default_has_an_ike_section_of_defaults():
    raw = tomllib.loads(DEFAULT.read_text())
    assert "ike" in raw
    cfg = cfgmod.load(DEFAULT)
    # "Every key below shows its default"
    assert cfg.role("ike") == IkeConfig()
    assert set(raw["ike"]) <= {f.name for f in attrs.fields(IkeConfig)}


# ------------------------------------------------------------------ docs/roles/ike.md
def _table(doc: str, heading: str, after: str | None = None) -> dict[str, list[str]]:
    """key -> cells of the first markdown table after ``heading`` (and after the line
    ``after`` within that section, if given)."""
    section = doc.split(heading, 1)[1]
    if after is not None:
        section = section.split(after, 1)[1]
    rows: dict[str, list[str]] = {}
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            m = re.fullmatch(r"`([a-z_0-9]+)`", cells[0])
            if m:
                rows[m.group(1)] = cells[1:]
        elif started:
            break
    return rows


def _render(value: object) -> str:
    """A default as the guide writes it (TOML-like)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if hasattr(value, "items"):
        return "{" + ", ".join(f"{k} = {_render(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _default(field: attrs.Attribute) -> object:
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return field.default.factory()
    return field.default


@pytest.mark.parametrize("cls, after", [(IkeConfig, None), (PeerPolicy, "`[[ike.peers]]`:")])
def test_guide_documents_every_key_with_its_default(guide, cls, after):
    rows = _table(guide, "## Config reference (`[ike]`)", after)
    fields = {f.name: f for f in attrs.fields(cls)}
    assert set(rows) == set(fields), (
        f"undocumented: {sorted(set(fields) - set(rows))}; not in {cls.__name__}: {sorted(set(rows) - set(fields))}")
    for name, field in fields.items():
        default_cell, meaning = rows[name][0], rows[name][1]
        assert meaning, name
        default = _default(field)
        if default is attrs.NOTHING:
            assert default_cell == "(required)", name
        elif name == "proposals":
            assert len(DEFAULT_PROPOSALS) == 72 and default_cell.startswith("72 ")
        else:
            assert default_cell == f"`{_render(default)}`" or (default is None and default_cell == "none"), (
                name, default_cell, _render(default))


def test_guide_lists_every_counter_and_the_metric(guide):
    documented = set()
    # the counter table; a row may name several counters: `a`, `b`
    for line in guide.split("Metrics: `narsuite_ike_events_total", 1)[1].split("## Troubleshooting", 1)[0].splitlines():
        if line.startswith("| `"):
            documented.update(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert set(engine.COUNTERS) <= documented, sorted(set(engine.COUNTERS) - documented)
    assert "narsuite_ike_events_total" in guide


def test_guide_names_every_narctl_command(guide):
    for command in ROLE.commands:
        assert f"narctl {command.name}" in guide, command.name
    assert "narctl hash-password" in guide


def test_guide_client_examples_are_the_lab_ones(guide, example):
    """(i) and (iii) are exactly what the lab tests load into strongSwan, with the example
    file's PSK, our local_id as the client's remote id, and the policy's local_ts."""
    rw = _policy(example, "rw")
    xauth = ikev1_client_conf("192.0.2.1", rw.secret.decode(), local_id="r1.example", remote_id=rw.local_id,
                              remote_ts=rw.local_ts[0], xauth_user="alice", xauth_password="change-me-alice")
    assert xauth.strip() in guide
    host = ikev1_client_conf("192.0.2.1", "CHANGE-ME-host-psk", local_id="r1.example", remote_id="gw.example")
    assert host.strip() in guide
    assert "pull = no" in guide
    # (ii): the certificate client authenticates with pubkey and names our DN; we present %cert
    assert "auth = pubkey" in guide and 'local_id = "%cert"' in guide


def test_guide_lists_every_ikev2_counter_and_the_client_example_is_the_lab_one(guide, example):
    from narsuite.ike.v2.engine import COUNTERS as V2
    from narsuite.lab.strongswan import ikev2_client_conf

    table = guide.split("| IKEv2 counter | meaning |", 1)[1].split("## Where the code is", 1)[0]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented.update(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert set(V2) <= documented, sorted(set(V2) - documented)
    rw2 = _policy(example, "rw2")
    assert rw2.versions == (2,) and rw2.pool == "ra" and _policy(example, "rw").versions == (1,)
    conf = ikev2_client_conf("192.0.2.1", rw2.secret.decode(), local_id="r1.example", remote_id=rw2.local_id,
                             remote_ts=rw2.local_ts[0])
    assert "\n".join("    " + x if x else "" for x in conf.strip().splitlines()) in guide
