"""Policy globs, first-match decisions, subjects, and parsing with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorcache.auth.identity import Identity
from mirrorcache.config import ConfigError
from mirrorcache.policy import Policy, Rule, compile_pattern, load_policy_file, parse_policy

ALICE = Identity("alice", frozenset({"team-a"}))
BOB = Identity("bob", frozenset({"team-b"}))


def rules(*specs: tuple[str, str]) -> Policy:
    return Policy(tuple(Rule(p, a, source_index=i) for i, (a, p) in enumerate(specs)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("pattern", "name", "tag", "expected"), [
    ("docker.io/library/*", "docker.io/library/alpine", "3.19", True),
    ("docker.io/library/*", "docker.io/library/alpine", None, True),
    ("docker.io/library/*", "docker.io/library/a/b", "x", False),
    ("docker.io/library/*", "docker.io/libraryx/alpine", "x", False),
    ("docker.io/library/*", "quay.io/library/alpine", "x", False),
    ("quay.io/prometheus/**", "quay.io/prometheus/node-exporter", "v1", True),
    ("quay.io/prometheus/**", "quay.io/prometheus/a/b/c", None, True),
    ("quay.io/prometheus/**", "quay.io/prometheus", None, True),
    ("quay.io/prometheus/**", "quay.io/prometheusx/a", None, False),
    ("quay.io/**/exporter", "quay.io/a/b/exporter", None, True),
    ("quay.io/**/exporter", "quay.io/exporter", None, True),
    ("quay.io/**/exporter", "quay.io/a/exporterx", None, False),
    ("ghcr.io/acme/*:v*", "ghcr.io/acme/app", "v1.2", True),
    ("ghcr.io/acme/*:v*", "ghcr.io/acme/app", "latest", False),
    ("ghcr.io/acme/*:v*", "ghcr.io/acme/app", None, False),  # tag rules never match digests
    ("ghcr.io/acme/app-*", "ghcr.io/acme/app-web", None, True),
    ("ghcr.io/acme/app-*", "ghcr.io/acme/app", None, False),
    ("*/library/*", "docker.io/library/alpine", None, True),
    ("localhost:5000/x/*", "localhost:5000/x/y", "t", True),
    ("localhost:5000/x/*:t", "localhost:5000/x/y", "t", True),
    ("docker.io/library/alpine:3.19", "docker.io/library/alpine", "3.19", True),
    ("docker.io/library/alpine:3.19", "docker.io/library/alpine", "3x19", False),
])
def test_glob(pattern: str, name: str, tag: str | None, expected: bool) -> None:
    assert Rule(pattern, "allow").matches_name(name, tag) is expected


@pytest.mark.parametrize("pattern", [
    "", "alpine", "docker.io//x", "docker.io/a**/b", "docker.io/UPPER/x", "docker.io/a/b:",
    "docker.io/a/b:t/x", "docker.io/a b", "docker.io/a/b:ta g", "docker.io/a/%2e%2e",
])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_pattern(pattern)


def test_first_match_wins_and_defaults() -> None:
    p = rules(("deny", "docker.io/library/evil"), ("allow", "docker.io/library/*"))
    d = p.decide(None, "docker.io", "library/evil", "1")
    assert not d.allowed and d.rule_text == "rules[0] (deny docker.io/library/evil)"
    d = p.decide(None, "docker.io", "library/alpine", "1")
    assert d.allowed and d.rule_text == "rules[1] (allow docker.io/library/*)"
    d = p.decide(None, "quay.io", "x/y", None)
    assert not d.allowed and d.rule_text is None and d.reason == "not on the allowlist"
    assert Policy().decide(None, "quay.io", "x/y", None).allowed  # no rules: allow all
    assert not Policy((), "deny").decide(None, "quay.io", "x/y", None).allowed
    assert Policy(p.rules, "allow").decide(None, "quay.io", "x/y", None).allowed


def test_tag_rules_then_repository_rule() -> None:
    p = rules(("allow", "ghcr.io/acme/*:v*"), ("deny", "ghcr.io/acme/*:*"),
              ("allow", "ghcr.io/acme/*"))
    assert p.decide(None, "ghcr.io", "acme/app", "v2").allowed
    assert not p.decide(None, "ghcr.io", "acme/app", "latest").allowed
    assert p.decide(None, "ghcr.io", "acme/app", None).allowed  # digests and blobs


def test_subjects() -> None:
    p = Policy((
        Rule("quay.io/team-a/**", "allow", groups=frozenset({"team-a"}), source_index=0),
        Rule("quay.io/team-b/**", "allow", users=frozenset({"bob"}), source_index=1),
        Rule("docker.io/library/*", "allow", anonymous=True, source_index=2),
        Rule("docker.io/library/bad", "deny", source_index=3),
        Rule("docker.io/**", "allow", source_index=4),
    ))
    on = {"auth_enabled": True}
    assert p.decide(ALICE, "quay.io", "team-a/app", "v1", **on).allowed
    assert not p.decide(BOB, "quay.io", "team-a/app", "v1", **on).allowed
    assert p.decide(BOB, "quay.io", "team-b/app", "v1", **on).allowed
    assert not p.decide(ALICE, "quay.io", "team-b/app", "v1", **on).allowed
    assert not p.decide(None, "quay.io", "team-a/app", "v1", **on).allowed
    # anonymous: true covers anonymous callers and everybody else
    assert p.decide(None, "docker.io", "library/alpine", "3", **on).allowed
    assert p.decide(ALICE, "docker.io", "library/alpine", "3", **on).allowed
    # a rule without subjects: every authenticated caller; anonymous only when auth is off
    assert p.decide(ALICE, "docker.io", "acme/app", "3", **on).allowed
    assert not p.decide(None, "docker.io", "acme/app", "3", **on).allowed
    assert p.decide(None, "docker.io", "acme/app", "3").allowed
    # a deny without subjects shuts out everybody, anonymous callers included
    assert not Policy(p.rules[3:]).decide(None, "docker.io", "library/bad", "1", **on).allowed
    assert not Policy(p.rules[3:]).decide(ALICE, "docker.io", "library/bad", "1", **on).allowed


def test_parse_policy_collects_problems_with_paths() -> None:
    problems: list[str] = []
    parse_policy({"default": "maybe", "rules": [
        {"allow": "docker.io/library/*"},
        {"allow": "a/b", "deny": "c/d"},
        {"deny": "nohost"},
        {"allow": "x.io/y", "users": "ci", "colour": 1},
        {"allow": "x.io/y", "anonymous": "yes"},
        "docker.io/x",
    ], "bogus": 1}, "policy", problems)
    assert problems == [
        "policy.bogus: unknown key",
        "policy.default: expected allow or deny",
        "policy.rules[1]: exactly one of allow or deny is required",
        "policy.rules[2].deny: 'nohost': expected <upstream>/<repository>, e.g. "
        "docker.io/library/* or quay.io/org/**",
        "policy.rules[3].colour: unknown key",
        "policy.rules[4].anonymous: expected true or false",
        "policy.rules[5]: expected a mapping such as {allow: docker.io/library/*}",
    ]


def test_load_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("default: deny\nrules:\n  - allow: docker.io/library/*\n    users: [ci]\n")
    p = load_policy_file(f)
    assert p.rules == (Rule("docker.io/library/*", "allow", users=frozenset({"ci"})),)
    for broken in ("", "rules: 3\n", "rules: [{allow: x}]\n", "rules: [\n", "- allow: a.io/b\n"):
        f.write_text(broken)
        with pytest.raises(ConfigError) as err:
            load_policy_file(f)
        assert all(p.startswith(str(f)) for p in err.value.problems)
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy_file(tmp_path / "missing.yaml")


_component = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4})?", fullmatch=True)
_names = st.lists(_component, min_size=1, max_size=5).map("/".join)


@given(repo=_names, tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}",
                                                           fullmatch=True)))
def test_star_star_and_exact(repo: str, tag: str | None) -> None:
    assert Rule("quay.io/**", "allow").matches_name(f"quay.io/{repo}", tag)
    assert Rule(f"quay.io/{repo}", "allow").matches_name(f"quay.io/{repo}", tag)
    assert not Rule(f"quay.io/{repo}", "allow").matches_name(f"quay.io/{repo}x", tag)
    single = Rule("quay.io/*", "allow").matches_name(f"quay.io/{repo}", tag)
    assert single is ("/" not in repo)
    if tag is not None:
        assert Rule(f"quay.io/{repo}:{tag}", "allow").matches_name(f"quay.io/{repo}", tag)
        assert not Rule(f"quay.io/{repo}:{tag}", "allow").matches_name(f"quay.io/{repo}", None)


@given(st.text(max_size=60))
def test_compile_pattern_never_crashes(pattern: str) -> None:
    try:
        name_re, _ = compile_pattern(pattern)
    except ValueError:
        return
    name_re.fullmatch("/docker.io/library/alpine")


@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
                    lambda c: st.one_of(st.lists(c, max_size=4),
                                        st.dictionaries(st.sampled_from(
                                            ["allow", "deny", "users", "groups", "anonymous",
                                             "rules", "default", "x"]), c, max_size=4)),
                    max_leaves=12))
def test_parse_policy_total(data: object) -> None:
    """Any YAML-shaped input yields a Policy or problems, never an exception."""
    problems: list[str] = []
    parse_policy(data, "policy", problems)
    parse_policy({"rules": data}, "policy", problems)
