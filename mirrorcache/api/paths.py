"""Parsing and validating the /v2/ request path and query before anything else happens."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import validate_tag

Kind = Literal["base", "manifest", "blob", "tags", "referrers"]

# Everything a valid name, tag or digest can contain; anything else (%, .., \, ;) is refused.
_SAFE_PATH_RE = re.compile(r"/v2(?:/[A-Za-z0-9._/:-]*)?")
_PAGE_RE = re.compile(r"[0-9]{1,6}")
_TAGS_SUFFIX = "/tags/list"
_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/"
                            r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
MAX_PAGE = 10000
_KINDS: dict[str, Kind] = {"manifests": "manifest", "blobs": "blob", "referrers": "referrers"}


@dataclass(frozen=True, slots=True)
class V2Path:
    """The endpoint a request addresses; ``name`` is the raw name from the path."""

    kind: Kind
    name: str = ""
    reference: str = ""


def parse_v2_path(raw_path: str) -> V2Path:
    """Parse the raw (undecoded) request path. Names, tags and digests are checked later by
    their own grammars; here anything outside their alphabet is refused outright."""
    if len(raw_path) > 2048:
        raise OCIError(ErrorCode.NAME_INVALID, "request path too long")
    if not _SAFE_PATH_RE.fullmatch(raw_path):
        raise OCIError(ErrorCode.NAME_INVALID,
                       "request path has characters no repository name, tag "
                       "or digest may contain")
    tail = raw_path[4:] if raw_path.startswith("/v2/") else ""
    if tail == "":
        return V2Path("base")
    segments = f"/{tail}/"
    if "//" in raw_path or "/../" in segments or "/./" in segments:
        raise OCIError(ErrorCode.NAME_INVALID, "empty or relative path segment")
    if "/blobs/uploads/" in segments:
        raise OCIError(ErrorCode.UNSUPPORTED, "this mirror is read-only: uploads are not supported")
    # <name>/tags/list, else <name>/<manifests|blobs|referrers>/<reference> (no empty
    # segment can reach here, and the name may have slashes: split from the right).
    if tail.endswith(_TAGS_SUFFIX) and len(tail) > len(_TAGS_SUFFIX):
        return V2Path("tags", tail[:-len(_TAGS_SUFFIX)])
    rest, _, ref = tail.rpartition("/")
    name, _, kind = rest.rpartition("/")
    if name and ref and kind in _KINDS:
        return V2Path(_KINDS[kind], name, ref)
    raise OCIError(ErrorCode.NAME_UNKNOWN, "no such endpoint", status=404)


def parse_page(n: str | None, last: str | None) -> dict[str, str]:
    """Validated ``n`` and ``last`` of a tag listing."""
    params: dict[str, str] = {}
    if n is not None:
        if not _PAGE_RE.fullmatch(n) or not 0 <= int(n) <= MAX_PAGE:
            raise OCIError(ErrorCode.PAGINATION_NUMBER_INVALID,
                           f"n must be an integer 0..{MAX_PAGE}")
        params["n"] = str(int(n))
    if last is not None:
        validate_tag(last)
        params["last"] = last
    return params


def parse_artifact_type(value: str | None) -> dict[str, str]:
    if value is None:
        return {}
    if not _MEDIA_TYPE_RE.fullmatch(value):
        raise OCIError(ErrorCode.UNSUPPORTED, "artifactType must be a media type", status=400)
    return {"artifactType": value}
