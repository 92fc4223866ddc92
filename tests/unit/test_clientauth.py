"""Client authentication pieces: header parsing, htpasswd/tokens, verification, the limiter."""

from __future__ import annotations

import base64

import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorcache.auth.authenticator import (
    Authenticator,
    BadCredentials,
    Credentials,
    parse_authorization,
)
from mirrorcache.auth.credentials import parse_htpasswd, parse_tokens
from mirrorcache.auth.identity import Identity
from mirrorcache.auth.limiter import FailedLoginLimiter

ALICE_HASH = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
TOKEN = "t0k3n-0123456789abcdef"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_parse_authorization() -> None:
    assert parse_authorization(None) is None
    assert parse_authorization("") is None
    assert parse_authorization("Basic Og==") is None  # containers/image without creds
    assert parse_authorization(basic("a", "b:c")) == Credentials("basic", "a", "b:c")
    assert parse_authorization("bearer xyz") == Credentials("bearer", None, "xyz")
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
                "Basic " + base64.b64encode(b"\xff:\xfe").decode(), "Digest x", "Bearer",
                "Negotiate abc"):
        with pytest.raises(BadCredentials):
            parse_authorization(bad)


@given(st.text(max_size=200))
def test_parse_authorization_total(value: str) -> None:
    try:
        parse_authorization(value)
    except BadCredentials:
        pass


def test_htpasswd_only_bcrypt() -> None:
    problems: list[str] = []
    users = parse_htpasswd("\n".join([
        f"alice:{ALICE_HASH}",
        "# comment",
        "md5:$apr1$abc$0123456789012345678901",
        "sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
        "crypt:rl0uT7E5hR5Ls",
        "nocolon",
        "a2:$2a$10$" + "a" * 53,
    ]), "auth.htpasswd", problems)
    assert users == {"alice": ALICE_HASH}
    assert len(problems) == 5
    assert problems[0] == ("auth.htpasswd: line 3: user 'md5' does not have a bcrypt hash "
                           "($2y$/$2b$; create it with htpasswd -B)")
    assert problems[3] == "auth.htpasswd: line 6: expected user:bcrypt-hash"


def test_tokens_parsing() -> None:
    problems: list[str] = []
    tokens = parse_tokens(f"ci:{TOKEN}\n# x\nbot:{TOKEN}x, short:abc\n:nameless0123456789",
                          "auth.tokens_env", problems)
    assert tokens == {"ci": TOKEN, "bot": TOKEN + "x"}
    assert len(problems) == 2 and "at least 16" in problems[0]


@pytest.fixture
def authn() -> Authenticator:
    return Authenticator({"alice": ALICE_HASH}, {"ci": TOKEN},
                         {"team-a": frozenset({"alice", "ci"}), "ops": frozenset({"alice"})})


async def test_verify(authn: Authenticator) -> None:
    alice = await authn.verify(Credentials("basic", "alice", "wonderland"))
    assert alice == Identity("alice", frozenset({"team-a", "ops"}))
    assert await authn.verify(Credentials("basic", "alice", "wonderland")) == alice  # cached
    assert await authn.verify(Credentials("bearer", None, TOKEN)) == Identity(
        "ci", frozenset({"team-a"}))
    assert (await authn.verify(Credentials("basic", "ci", TOKEN))).name == "ci"
    for creds, reason in [
        (Credentials("basic", "alice", "wrong"), "wrong password"),
        (Credentials("basic", "alice", "x" * 100), "wrong password"),  # > 72 bytes
        (Credentials("basic", "ci", TOKEN + "x"), "wrong token"),
        (Credentials("basic", "mallory", "pw"), "unknown user"),
        (Credentials("bearer", None, TOKEN[:-1]), "unknown token"),
    ]:
        with pytest.raises(BadCredentials) as err:
            await authn.verify(creds)
        assert err.value.reason == reason


def test_limiter_sliding_window() -> None:
    now = [1000.0]
    lim = FailedLoginLimiter(3, 60.0, clock=lambda: now[0], max_addresses=2)
    for _ in range(2):
        lim.failure("10.0.0.1")
    assert lim.retry_after("10.0.0.1") is None
    lim.failure("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == pytest.approx(60.0)
    assert lim.retry_after("10.0.0.2") is None
    now[0] += 30
    assert lim.retry_after("10.0.0.1") == pytest.approx(30.0)
    now[0] += 30.5
    assert lim.retry_after("10.0.0.1") is None
    # bounded memory: a third address evicts the least recently failing one
    lim.failure("a")
    lim.failure("b")
    lim.failure("c")
    assert len(lim._failures) == 2
    assert FailedLoginLimiter(0, 60).retry_after("x") is None  # 0 disables


def test_limiter_reserve_counts_before_the_check() -> None:
    now = [1000.0]
    lim = FailedLoginLimiter(3, 60.0, clock=lambda: now[0])
    assert [lim.reserve("a") for _ in range(5)] == [None, None, None,
                                                   pytest.approx(60.0), pytest.approx(60.0)]
    lim.release("a")  # one of the three succeeded: its slot comes back
    assert lim.reserve("a") is None
    assert lim.reserve("a") == pytest.approx(60.0)
    assert FailedLoginLimiter(0, 60).reserve("x") is None  # 0 disables


async def test_every_name_costs_exactly_one_bcrypt(authn: Authenticator,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown users, known users and token names cannot be told apart by timing: each
    wrong login costs one bcrypt check, at the users' cost, in the bcrypt threads."""
    import threading

    from mirrorcache.auth import authenticator as mod

    calls: list[tuple[bytes, str]] = []
    real = mod._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append((hashed[:7], threading.current_thread().name))
        return real(password, hashed)

    monkeypatch.setattr(mod, "_checkpw", counting)
    for creds in [Credentials("basic", "mallory", "pw"),        # unknown user
                  Credentials("basic", "alice", "wrong"),       # known user, wrong password
                  Credentials("basic", "ci", TOKEN + "x"),      # known token name, wrong token
                  Credentials("bearer", None, TOKEN[:-1])]:     # unknown bearer token
        calls.clear()
        with pytest.raises(BadCredentials):
            await authn.verify(creds)
        assert len(calls) == 1, creds
        assert calls[0][0] == b"$2y$04$" or calls[0][0] == b"$2b$04$"  # same cost as alice
        assert calls[0][1].startswith("mirrorcache-bcrypt")
    # A right token costs one check too, then is remembered like a right password.
    calls.clear()
    assert (await authn.verify(Credentials("bearer", None, TOKEN))).name == "ci"
    assert (await authn.verify(Credentials("bearer", None, TOKEN))).name == "ci"
    assert len(calls) == 1
    await authn.aclose()


async def test_bcrypt_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading

    from mirrorcache.auth import authenticator as mod

    gate = threading.Event()
    monkeypatch.setattr(mod, "_checkpw", lambda p, h: gate.wait(10) and False)
    authn = Authenticator({"alice": ALICE_HASH}, {}, {}, max_pending=4)
    tasks = [asyncio.create_task(authn.verify(Credentials("basic", "alice", f"w{i}")))
             for i in range(6)]
    await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_EXCEPTION)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, mod.Overloaded) for r in results) == 2
    assert sum(isinstance(r, BadCredentials) for r in results) == 4
    await authn.aclose()


def test_client_key_groups_ipv6_by_64() -> None:
    from mirrorcache.connections import client_key

    assert client_key("10.1.2.3") == "10.1.2.3"
    assert client_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2::ffff") == \
        "2001:db8:1:2::/64"
    assert client_key(None) == "unknown"
