"""Cluster building blocks: rendezvous ownership, the peer signature, the config section."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from mirrorcache.cluster import hrw, signing
from mirrorcache.config import ConfigError, parse_config
from mirrorcache.proxy.owners import blob_key, manifest_key, tag_key

KEYS = [blob_key(f"sha256:{i:064x}") for i in range(3000)] + [
    tag_key("docker.io", f"library/r{i}", "latest") for i in range(1000)]


def owners(members: list[str]) -> dict[str, str]:
    return {k: hrw.owner(k, members) or "" for k in KEYS}


def test_owner_is_deterministic_and_spread() -> None:
    members = ["10.0.0.1:5000", "10.0.0.2:5000", "10.0.0.3:5000"]
    first = owners(members)
    assert first == owners(list(reversed(members)))  # order of the list does not matter
    share = {m: sum(1 for o in first.values() if o == m) / len(KEYS) for m in members}
    assert all(0.28 < s < 0.39 for s in share.values()), share
    assert hrw.owner("blob:x", []) is None
    assert manifest_key("sha256:ab") == "manifest:sha256:ab"


def test_only_the_changed_members_keys_move() -> None:
    three = ["a:1", "b:1", "c:1"]
    four = [*three, "d:1"]
    before, after = owners(three), owners(four)
    moved = [k for k in KEYS if before[k] != after[k]]
    # Every moved key went to the new member, and it took about a quarter.
    assert all(after[k] == "d:1" for k in moved)
    assert 0.2 < len(moved) / len(KEYS) < 0.3
    two = ["a:1", "c:1"]  # b leaves the four
    later = owners(two)
    moved = [k for k in KEYS if after[k] != later[k]]
    # From four to two: b's and d's keys move, nobody else's.
    assert all(after[k] in ("b:1", "d:1") for k in moved)
    assert all(later[k] == after[k] for k in KEYS if after[k] in ("a:1", "c:1"))
    assert 0.4 < len(moved) / len(KEYS) < 0.6


def test_signature_round_trip_skew_and_tamper() -> None:
    secret = "s" * 32
    path = "/_mirrorcache/peer/v1/blobs/sha256:ab?upstream=docker.io&repository=library%2Fx"
    h = signing.headers(secret, "GET", path, 1000.0)
    ts, sig = h[signing.TIME_HEADER], h[signing.SIGNATURE_HEADER]
    assert signing.verify(secret, "GET", path, ts, sig, 1000.0) is None
    assert signing.verify(secret, "GET", path, ts, sig, 1059.0) is None
    assert signing.verify(secret, "GET", path, ts, sig, 1061.0) == \
        "timestamp outside the allowed skew"
    assert signing.verify(secret, "GET", path.replace("library", "other"), ts, sig,
                          1000.0) == "bad signature"
    assert signing.verify(secret, "HEAD", path, ts, sig, 1000.0) == "bad signature"
    assert signing.verify("t" * 32, "GET", path, ts, sig, 1000.0) == "bad signature"
    assert signing.verify(secret, "GET", path, None, None, 1000.0) == "unsigned"
    assert signing.verify(secret, "GET", path, "x", sig, 1000.0) == "bad timestamp"
    assert set(sig) <= set(string.hexdigits)


def _raw(cluster: object) -> dict[str, object]:
    return {"listen": "127.0.0.1:5000", "storage": {"filesystem": {"path": "/tmp/x"}},
            "upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}},
            "cluster": cluster}


def test_cluster_config(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n")
    cfg = parse_config(_raw({"peers": ["127.0.0.1:5001", "127.0.0.1:5002"],
                             "secret_file": str(secret),
                             "owner_first_byte_timeout": "2s"}), {})
    assert cfg.cluster.enabled
    assert cfg.cluster.self_address == "127.0.0.1:5000"
    assert cfg.cluster.secret == "0123456789abcdef0123"
    assert cfg.cluster.owner_first_byte_timeout == 2.0
    assert "0123456789" not in repr(cfg.cluster)
    cfg = parse_config(_raw({"peers": {"dns": "mirror-headless:5000"},
                             "secret_file": str(secret)}), {"POD_IP": "10.1.2.3"})
    assert cfg.cluster.dns == "mirror-headless:5000" and cfg.cluster.peers == ()
    assert cfg.cluster.self_address == "10.1.2.3:5000"
    assert not parse_config(_raw(None), {}).cluster.enabled


@pytest.mark.parametrize(("cluster", "problem"), [
    ({"peers": ["127.0.0.1:5001"]}, "cluster.secret_file: is required when peers are set"),
    ({"peers": ["nope"], "secret_file": "/nonexistent"}, "cluster.peers: expected HOST:PORT"),
    ({"peers": ["127.0.0.1:5001"], "secret_file": "/nonexistent"},
     "cluster.secret_file: cannot read file"),
    ({"peers": {"dns": "x"}, "secret_file": "/nonexistent"}, "cluster.peers.dns: expected"),
    ({"peers": ["127.0.0.1:5001"], "peer_request_timeout": "0s"},
     "cluster.peer_request_timeout: must be more than 0"),
    ({"peerz": []}, "cluster.peerz: unknown key"),
])
def test_cluster_config_problems(cluster: object, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_raw(cluster), {})
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


async def test_membership_dns_health_and_ownership() -> None:
    import aiohttp

    from mirrorcache.cluster.membership import Membership
    from mirrorcache.config import ClusterConfig
    from mirrorcache.metrics import Metrics

    cfg = ClusterConfig(dns="localhost:1", self_address="127.0.0.9:1", secret="x" * 16)
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        m = Membership(cfg, session, metrics)
        await m.resolve()
        assert "127.0.0.1:1" in m.configured() and "127.0.0.9:1" in m.configured()
        # Nothing listens on port 1: the probe marks the peers down, only self owns keys.
        await m.probe_all()
        assert m.members() == ["127.0.0.9:1"]
        assert m.owner("blob:sha256:00") == "127.0.0.9:1"
        assert metrics.registry.get_sample_value("mirrorcache_cluster_members",
                                                 {"health": "unhealthy"}) >= 1
        m.set_peers([], "test")
        assert m.configured() == ["127.0.0.9:1"]
