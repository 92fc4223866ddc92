"""Allow/deny decisions over canonical names ``<upstream>/<repository>[:tag]``: pure data.

A policy is an ordered list of rules and a default; the first rule that matches the caller
and the name decides. Patterns are globs over ``/``-separated segments: ``*`` within a
segment matches any characters of that segment, a whole ``**`` segment matches any number of
segments (zero included), and an optional ``:tagglob`` restricts a rule to tags
(``ghcr.io/acme/*:v*``). A rule with a tag part never matches a request by digest (blobs,
manifests by digest, tag lists, referrers); a rule without one matches every tag and digest
of the repositories it names. The default is ``deny`` as soon as any rule exists.

Subjects: ``users``/``groups`` narrow a rule to those identities; ``anonymous: true`` makes it
also apply to callers who sent no credentials. A rule naming nobody applies to everybody,
except that with client authentication on, an ``allow`` without ``anonymous: true`` does not
let anonymous callers in (a ``deny`` naming nobody does shut everybody out).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mirrorcache.yamlfile import ConfigError, read_yaml_file

if TYPE_CHECKING:
    from mirrorcache.auth.identity import Identity

Action = Literal["allow", "deny"]
ACTIONS: tuple[Action, ...] = ("allow", "deny")
_NAME_SEGMENT_RE = re.compile(r"[a-z0-9._:*-]+")
_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9._*-]{1,128}")
_RULE_KEYS = frozenset({"allow", "deny", "users", "groups", "anonymous"})


@dataclass(frozen=True)
class Rule:
    """One ordered allow/deny rule of a policy."""

    pattern: str
    action: Action
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    anonymous: bool = False
    source_index: int = 0
    _name_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _tag_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name_re, tag_re = compile_pattern(self.pattern)
        object.__setattr__(self, "_name_re", name_re)
        object.__setattr__(self, "_tag_re", tag_re)

    @property
    def text(self) -> str:
        """``rules[2] (deny quay.io/team-b/** groups=team-b)``: how logs and 403s name it."""
        who = []
        if self.users:
            who.append("users=" + ",".join(sorted(self.users)))
        if self.groups:
            who.append("groups=" + ",".join(sorted(self.groups)))
        if self.anonymous:
            who.append("anonymous")
        extra = (" " + " ".join(who)) if who else ""
        return f"rules[{self.source_index}] ({self.action} {self.pattern}{extra})"

    def applies_to(self, identity: Identity | None, auth_enabled: bool) -> bool:
        """Whether this rule speaks about this caller (None: no credentials)."""
        if identity is None:
            if self.anonymous:
                return True
            if self.users or self.groups:
                return False
            # A deny without subjects is for everybody; an allow grants anonymous callers
            # access only when it says so (or when nobody authenticates at all).
            return self.action == "deny" or not auth_enabled
        if not self.users and not self.groups:
            return True
        return identity.name in self.users or not self.groups.isdisjoint(identity.groups)

    def matches_name(self, name: str, tag: str | None) -> bool:
        if not self._name_re.fullmatch("/" + name):
            return False
        if self._tag_re is None:
            return True
        return tag is not None and self._tag_re.fullmatch(tag) is not None


@dataclass(frozen=True)
class Decision:
    """The outcome of :meth:`Policy.decide`: the verdict and the rule that made it."""

    allowed: bool
    rule_text: str | None
    reason: str


_ALLOWED_BY_DEFAULT = Decision(True, None, "allowed by default (no rule matched)")
_NOT_ON_ALLOWLIST = Decision(False, None, "not on the allowlist")


@dataclass(frozen=True)
class Policy:
    """Ordered rules plus a default; first match wins. No rules and no default: allow all."""

    rules: tuple[Rule, ...] = ()
    default: Action | None = None

    @property
    def effective_default(self) -> Action:
        if self.default is not None:
            return self.default
        return "deny" if self.rules else "allow"

    def decide(self, identity: Identity | None, upstream: str, repository: str,
               tag: str | None, *, auth_enabled: bool = False) -> Decision:
        """Decide a pull of ``upstream/repository`` (by ``tag``, or by digest when None).

        ``auth_enabled``: client authentication is on, so a caller without credentials
        (``identity`` None) is only matched by rules that say ``anonymous: true``.
        """
        if self.rules:
            name = f"{upstream}/{repository}"
            for rule in self.rules:
                if rule.applies_to(identity, auth_enabled) and rule.matches_name(name, tag):
                    allowed = rule.action == "allow"
                    return Decision(allowed, rule.text,
                                    f"{'allowed' if allowed else 'denied'} by {rule.text}")
        if self.effective_default == "allow":
            return _ALLOWED_BY_DEFAULT
        return _NOT_ON_ALLOWLIST


def compile_pattern(pattern: str) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    """Regexes for the name part (matched against ``"/" + name``) and the optional tag part.

    Raises ValueError with a message for a malformed pattern.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("expected a pattern such as docker.io/library/*")
    name_part, tag_part = pattern, None
    slash = pattern.rfind("/")
    colon = pattern.rfind(":")
    if colon > slash >= 0:
        name_part, tag_part = pattern[:colon], pattern[colon + 1:]
    segments = name_part.split("/")
    if len(segments) < 2:
        raise ValueError(f"{pattern!r}: expected <upstream>/<repository>, e.g. "
                         "docker.io/library/* or quay.io/org/**")
    out = []
    for i, seg in enumerate(segments):
        if i > 0 and ":" in seg:
            raise ValueError(f"{pattern!r}: ':' may only follow the repository, as :tagglob")
        if seg == "**":
            out.append(r"(?:/[^/]+)*")
            continue
        if not seg:
            raise ValueError(f"{pattern!r}: empty path segment")
        if "**" in seg:
            raise ValueError(f"{pattern!r}: ** must be a whole segment")
        if not _NAME_SEGMENT_RE.fullmatch(seg):
            raise ValueError(f"{pattern!r}: segment {seg!r} has characters no upstream or "
                             "repository name can contain (names are lower case)")
        body = "".join("[^/]*" if c == "*" else re.escape(c) for c in seg)
        out.append("/" + (r"[^/]+" if seg == "*" else body))
    tag_re = None
    if tag_part is not None:
        if not _TAG_GLOB_RE.fullmatch(tag_part):
            raise ValueError(f"{pattern!r}: tag part {tag_part!r} is not a tag glob")
        tag_re = re.compile("".join(".*" if c == "*" else re.escape(c) for c in tag_part))
    return re.compile("".join(out)), tag_re


def _str_set(value: object, where: str, problems: list[str]) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}: expected a list of names")
        return frozenset()
    return frozenset(value)


def parse_rules(data: object, path: str, problems: list[str]) -> tuple[Rule, ...]:
    """Rules from a YAML list of ``{allow|deny: PATTERN, users?, groups?, anonymous?}``."""
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.append(f"{path}: expected a list of rules")
        return ()
    rules: list[Rule] = []
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping such as {{allow: docker.io/library/*}}")
            continue
        for key in item:
            if key not in _RULE_KEYS:
                problems.append(f"{where}.{key}: unknown key")
        actions = [a for a in ACTIONS if a in item]
        if len(actions) != 1:
            problems.append(f"{where}: exactly one of allow or deny is required")
            continue
        action = actions[0]
        pattern = item[action]
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            problems.append(f"{where}.{action}: {exc}")
            continue
        anonymous = item.get("anonymous", False)
        if not isinstance(anonymous, bool):
            problems.append(f"{where}.anonymous: expected true or false")
            anonymous = False
        rules.append(Rule(
            pattern=pattern, action=action,
            users=_str_set(item.get("users"), f"{where}.users", problems),
            groups=_str_set(item.get("groups"), f"{where}.groups", problems),
            anonymous=anonymous, source_index=i,
        ))
    return tuple(rules)


def parse_policy(data: object, path_prefix: str, problems: list[str],
                 *, extra_keys: Sequence[str] = ()) -> Policy:
    """A Policy from ``{default?: allow|deny, rules?: [...]}``; problems get ``path_prefix``.

    ``extra_keys`` are keys the caller reads itself (``file``, ``reload_interval`` in the
    main config) and are not reported as unknown.
    """
    def key(name: str) -> str:
        return f"{path_prefix}.{name}" if path_prefix else name

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{path_prefix or '(root)'}: expected a mapping with rules and default")
        return Policy()
    for name in data:
        if name not in ("default", "rules", *extra_keys):
            problems.append(f"{key(str(name))}: unknown key")
    default: Any = data.get("default")
    if default is not None and default not in ACTIONS:
        problems.append(f"{key('default')}: expected allow or deny")
        default = None
    return Policy(parse_rules(data.get("rules"), key("rules"), problems), default)


def load_policy_file(path: str | Path) -> Policy:
    """Read a policy file (YAML ``{default?, rules}``); raise ConfigError listing problems."""
    data = read_yaml_file(path)
    problems: list[str] = []
    if not isinstance(data, Mapping) or "rules" not in data:
        # An empty or truncated file must not silently become "allow everything".
        problems.append("rules is required (write rules: [] and default: allow to allow "
                        "everything)")
    policy = parse_policy(data, "", problems)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return policy
