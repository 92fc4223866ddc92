"""Property-based tests for the request parsers hostile input goes through first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mirrorcache.api.paths import parse_page, parse_v2_path
from mirrorcache.errors import OCIError
from mirrorcache.oci.reference import DIGEST_ALGORITHMS, Digest, Reference, validate_name
from mirrorcache.proxy.routing import Router

_component = st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True)
valid_names = st.lists(_component, min_size=1, max_size=6).map("/".join).filter(
    lambda n: len(n) <= 255)
hostile_text = st.text(alphabet=st.sampled_from(list("aZ09./_-:%@\\~\r\n\x00 \t?#;ä*+=")) |
                       st.characters(), max_size=300)
ROUTER = Router({"docker.io": None, "quay.io": None}, "docker.io")


def _rejected_cleanly(exc: OCIError) -> None:
    assert 400 <= exc.status < 500
    assert exc.body()["errors"][0]["code"] == exc.code


@given(valid_names)
def test_valid_names_accepted(name: str) -> None:
    assert validate_name(name) == name


@given(hostile_text)
def test_validate_name_only_accepts_grammar(name: str) -> None:
    try:
        validate_name(name)
    except OCIError as exc:
        _rejected_cleanly(exc)
        return
    assert len(name) <= 255 and name == name.lower() and name.isascii()
    assert not set(name) & set("%\\:@\r\n\x00 ")
    assert ".." not in name and "//" not in name
    assert not name.startswith(("/", ".", "-", "_")) and not name.endswith(("/", ".", "-", "_"))


@given(st.one_of(hostile_text, st.builds(lambda p, t: f"/v2/{p}{t}", hostile_text,
                                         st.sampled_from(["/manifests/v1", "/tags/list",
                                                          "/blobs/sha256:" + "a" * 64, ""]))))
def test_parse_v2_path(raw: str) -> None:
    try:
        path = parse_v2_path(raw)
    except OCIError as exc:
        _rejected_cleanly(exc)
        return
    for part in (path.name, path.reference):
        assert not set(part) & set("%\\\r\n\x00 ?#;")
        assert ".." not in part.split("/") and "." not in part.split("/")
    assert len(raw) <= 2048


@given(hostile_text, st.one_of(st.none(), hostile_text))
def test_router_only_reaches_configured_upstreams(name: str, ns: str | None) -> None:
    try:
        target = ROUTER.resolve(name, ns)
    except OCIError as exc:
        _rejected_cleanly(exc)
        return
    assert target.upstream in ("docker.io", "quay.io")
    assert validate_name(target.repository)


@given(st.one_of(hostile_text, st.builds(lambda a, h: f"{a}:{h}",
                                         st.sampled_from(["sha256", "sha512", "sha384", "md5",
                                                          "SHA256", "sha256+b64"]),
                                         st.text(alphabet="0123456789abcdefABCDEF", max_size=130))))
def test_digest_parse(value: str) -> None:
    try:
        d = Digest.parse(value)
    except OCIError as exc:
        _rejected_cleanly(exc)
        assert exc.code == "DIGEST_INVALID"
        return
    assert len(d.hex) == DIGEST_ALGORITHMS[d.algorithm]
    assert set(d.hex) <= set("0123456789abcdef") and str(d) == value


@given(hostile_text)
def test_reference_parse(value: str) -> None:
    try:
        ref = Reference.parse(value)
    except OCIError as exc:
        _rejected_cleanly(exc)
        return
    assert str(ref) == value and len(value) <= 7 + 128


# n: ASCII and non-ASCII digits ('²') alike must be rejected cleanly (no 500).
@given(st.one_of(st.none(), hostile_text, st.sampled_from(["²", "١٢", "\uff11\uff10", "1²"])),
       st.one_of(st.none(), hostile_text))
def test_parse_page(n: str | None, last: str | None) -> None:
    try:
        params = parse_page(n, last)
    except OCIError as exc:
        _rejected_cleanly(exc)
        return
    if "n" in params:
        assert 0 <= int(params["n"]) <= 10000
    if "last" in params:
        assert Reference.parse(params["last"]).tag == params["last"]
