"""The /v2/ path parser and tag-list pagination parameters (mirrorcache.api.paths)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorcache.api.paths import V2Path, parse_artifact_type, parse_page, parse_v2_path
from mirrorcache.errors import OCIError

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v2/", V2Path("base")),
        ("/v2", V2Path("base")),
        ("/v2/library/alpine/manifests/3.19", V2Path("manifest", "library/alpine", "3.19")),
        ("/v2/alpine/manifests/latest", V2Path("manifest", "alpine", "latest")),
        (f"/v2/library/alpine/manifests/{DIGEST}", V2Path("manifest", "library/alpine", DIGEST)),
        ("/v2/a/manifests/b/manifests/latest", V2Path("manifest", "a/manifests/b", "latest")),
        ("/v2/manifests/manifests/x", V2Path("manifest", "manifests", "x")),
        (f"/v2/a/blobs/b/blobs/{DIGEST}", V2Path("blob", "a/blobs/b", DIGEST)),
        (f"/v2/library/alpine/blobs/{DIGEST}", V2Path("blob", "library/alpine", DIGEST)),
        ("/v2/library/alpine/tags/list", V2Path("tags", "library/alpine")),
        ("/v2/a/tags/list/tags/list", V2Path("tags", "a/tags/list")),
        ("/v2/a/manifests/tags/list", V2Path("tags", "a/manifests")),
        ("/v2/a/tags/list/manifests/x", V2Path("manifest", "a/tags/list", "x")),
        (f"/v2/library/alpine/referrers/{DIGEST}",
         V2Path("referrers", "library/alpine", DIGEST)),
        ("/v2/quay.io/prometheus/node-exporter/manifests/v1.7.0",
         V2Path("manifest", "quay.io/prometheus/node-exporter", "v1.7.0")),
        ("/v2/localhost:5000/x/manifests/latest", V2Path("manifest", "localhost:5000/x",
                                                           "latest")),
    ],
)
def test_parse_v2_path(raw: str, expected: V2Path) -> None:
    assert parse_v2_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code", "status"),
    [
        ("/v2/a/%2e%2e/b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a/%2E%2E/b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a/../b/manifests/x", "NAME_INVALID", 400),
        ("/v2/../manifests/x", "NAME_INVALID", 400),
        ("/v2/a/./b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a/b/manifests/..", "NAME_INVALID", 400),
        ("/v2/a//b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a/b/manifests/x%0d%0a", "NAME_INVALID", 400),
        ("/v2/a/b/manifests/x\r\nSet-Cookie:1", "NAME_INVALID", 400),
        ("/v2/a\\b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a%2fb/manifests/x", "NAME_INVALID", 400),
        ("/v2/a;b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a b/manifests/x", "NAME_INVALID", 400),
        ("/v2/a/manifests/x?y", "NAME_INVALID", 400),
        ("/v2/a\x00/manifests/x", "NAME_INVALID", 400),
        ("/v2/" + "a/" * 1100 + "manifests/x", "NAME_INVALID", 400),
        ("/v2/a/blobs/uploads/", "UNSUPPORTED", 405),
        ("/v2/a/blobs/uploads/some-uuid", "UNSUPPORTED", 405),
        ("/v2/library/alpine/blobs/uploads", "UNSUPPORTED", 405),
        ("/v2/_catalog", "NAME_UNKNOWN", 404),
        ("/v2/a/b", "NAME_UNKNOWN", 404),
        ("/v2/a/manifests/", "NAME_UNKNOWN", 404),
        ("/v2/a/tags/list/", "NAME_UNKNOWN", 404),
        ("/v2/a/manifests/x/", "NAME_UNKNOWN", 404),
        ("/v2/manifests/x", "NAME_UNKNOWN", 404),
        ("/v2/tags/list", "NAME_UNKNOWN", 404),
        ("/v2/a/tags/lists", "NAME_UNKNOWN", 404),
        ("/v2/a/uploads/manifests/x/blobs/uploads", "UNSUPPORTED", 405),
        ("/v3/a/manifests/x", "NAME_INVALID", 400),
        ("/", "NAME_INVALID", 400),
    ],
)
def test_hostile_or_unknown_paths(raw: str, code: str, status: int) -> None:
    with pytest.raises(OCIError) as exc_info:
        parse_v2_path(raw)
    assert (exc_info.value.code, exc_info.value.status) == (code, status)


@pytest.mark.parametrize("raw", ["/v2//a/manifests/x", "/v2//library/alpine/tags/list"])
def test_empty_segment_right_after_v2_is_refused(raw: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        parse_v2_path(raw)
    assert exc_info.value.code == "NAME_INVALID"


@pytest.mark.parametrize("raw", ["/v2abc", "/v2library/alpine/manifests/latest"])
def test_v2_prefix_must_end_in_slash(raw: str) -> None:
    with pytest.raises(OCIError):
        parse_v2_path(raw)


def test_repository_named_like_uploads_is_not_an_upload() -> None:
    assert parse_v2_path("/v2/a/blobs/uploads-cache/manifests/latest") == V2Path(
        "manifest", "a/blobs/uploads-cache", "latest")


_path_alphabet = st.sampled_from([*"/v2abc.:-_%\\ ?#\r\n", "manifests", "blobs", "tags",
                                  "list", "uploads", "..", "referrers", DIGEST])


@given(st.one_of(
    st.text(max_size=80),
    st.text(max_size=60).map(lambda t: "/v2/" + t),
    st.lists(_path_alphabet, max_size=20).map(lambda parts: "/v2/" + "".join(parts)),
))
def test_parse_v2_path_only_raises_oci_errors(raw: str) -> None:
    try:
        result = parse_v2_path(raw)
    except OCIError as exc:
        assert exc.code in ("NAME_INVALID", "NAME_UNKNOWN", "UNSUPPORTED")
        assert exc.status in (400, 404, 405)
        return
    assert result.kind in ("base", "manifest", "blob", "tags", "referrers")
    for bad in ("%", "\\", "//", "\r", "\n", " "):
        assert bad not in result.name + result.reference
    assert ".." not in result.name.split("/")
    if result.kind != "base":
        assert result.name


# --- pagination --------------------------------------------------------------------------


def test_parse_page_valid() -> None:
    assert parse_page(None, None) == {}
    assert parse_page("0", None) == {"n": "0"}
    assert parse_page("050", None) == {"n": "50"}
    assert parse_page("10000", "v1.2") == {"n": "10000", "last": "v1.2"}
    assert parse_page(None, "latest") == {"last": "latest"}


@pytest.mark.parametrize("n", ["-1", "abc", "99999999", "10001", "", "1.5", " 5", "1e3",
                               "0x10"])
def test_parse_page_bad_n(n: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        parse_page(n, None)
    assert (exc_info.value.code, exc_info.value.status) == ("PAGINATION_NUMBER_INVALID", 400)


@pytest.mark.parametrize("last", [".x", "a/b", "x" * 129, "a b", ""])
def test_parse_page_bad_last(last: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        parse_page("10", last)
    assert exc_info.value.code == "TAG_INVALID"


def test_parse_page_superscript_digit() -> None:
    with pytest.raises(OCIError) as exc_info:
        parse_page("²", None)
    assert exc_info.value.code == "PAGINATION_NUMBER_INVALID"


def test_parse_artifact_type() -> None:
    assert parse_artifact_type(None) == {}
    assert parse_artifact_type("application/vnd.example+json") == {
        "artifactType": "application/vnd.example+json"}
    for bad in ("nonsense", "a/b/c", "application/json; charset=utf-8", ""):
        with pytest.raises(OCIError) as exc_info:
            parse_artifact_type(bad)
        assert (exc_info.value.code, exc_info.value.status) == ("UNSUPPORTED", 400)
