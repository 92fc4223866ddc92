"""Parsing credential files (htpasswd with bcrypt, static tokens): pure, used by config."""

from __future__ import annotations

import re

#: bcrypt variants accepted in htpasswd files (``htpasswd -B`` writes $2y$).
BCRYPT_PREFIXES = ("$2y$", "$2b$")
_BCRYPT_RE = re.compile(r"\$2[by]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def parse_htpasswd(text: str, where: str, problems: list[str]) -> dict[str, str]:
    """``user:$2y$...`` lines -> {user: hash}. Non-bcrypt entries are problems, not skipped
    silently: an MD5/SHA1/crypt line would otherwise lock a user out without a word."""
    users: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _NAME_RE.fullmatch(user):
            problems.append(f"{where}: line {lineno}: expected user:bcrypt-hash")
            continue
        if not hashed.startswith(BCRYPT_PREFIXES) or not _BCRYPT_RE.fullmatch(hashed):
            problems.append(f"{where}: line {lineno}: user {user!r} does not have a bcrypt "
                            "hash ($2y$/$2b$; create it with htpasswd -B)")
            continue
        if user in users:
            problems.append(f"{where}: line {lineno}: user {user!r} listed twice")
        users[user] = hashed
    return users


def parse_tokens(text: str, where: str, problems: list[str]) -> dict[str, str]:
    """``name:token`` entries (one a line, or comma-separated) -> {name: token}."""
    tokens: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for n, entry in enumerate(e for e in entries if e and not e.startswith("#")):
        name, sep, token = entry.partition(":")
        if not sep or not _NAME_RE.fullmatch(name):
            problems.append(f"{where}: entry {n + 1}: expected name:token")
            continue
        if len(token) < 16 or any(c.isspace() for c in token):
            problems.append(f"{where}: entry {n + 1} ({name}): tokens must be at least 16 "
                            "characters without spaces")
            continue
        if name in tokens:
            problems.append(f"{where}: entry {n + 1}: token name {name!r} listed twice")
        tokens[name] = token
    return tokens
