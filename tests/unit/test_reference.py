"""Repository name, tag and digest grammars (mirrorcache.oci.reference)."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorcache.errors import OCIError
from mirrorcache.oci.reference import Digest, Reference, validate_name, validate_tag

# The name grammar exactly as the OCI distribution spec writes it.
SPEC_NAME_RE = re.compile(
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
)
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _code(exc_info: pytest.ExceptionInfo[OCIError]) -> tuple[str, int]:
    return exc_info.value.code, exc_info.value.status


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["library/alpine", "a/b-c/d__e", "a.b/c", "alpine", "a--b", "a_b/c.d/e-f", "0/1/2",
     "a" * 255],
)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "Library/alpine",  # uppercase
        "library/Alpine",
        "a..b",  # double dot
        "a/../b",
        "/library/alpine",  # leading slash
        "library/alpine/",  # trailing slash
        "a//b",  # empty component
        "a" * 256,  # too long
        "-a",  # leading separator
        "a-",
        "a/-b",
        "a___b",  # three underscores
        "a_.b",
        "",
        "a b",
        "a%2fb",
        "a\\b",
        "a:b",
    ],
)
def test_invalid_names_raise_name_invalid(name: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        validate_name(name)
    assert _code(exc_info) == ("NAME_INVALID", 400)


def test_name_length_limit_is_255_including_slashes() -> None:
    name = "/".join(["abc"] * 64)  # 64*3 + 63 = 255
    assert len(name) == 255
    assert validate_name(name) == name
    with pytest.raises(OCIError) as exc_info:
        validate_name(name + "d")
    assert exc_info.value.code == "NAME_INVALID"
    assert "255" in exc_info.value.message


_name_chars = st.text(alphabet="abz09._-/%\\A", max_size=40)
_alnum = st.text(alphabet="abcxyz0189", min_size=1, max_size=6)
_sep = st.sampled_from([".", "_", "__", "-", "--", "---"])
_component = st.builds(
    lambda first, rest: first + "".join(s + a for s, a in rest),
    _alnum,
    st.lists(st.tuples(_sep, _alnum), max_size=3),
)
#: Names built from the spec's productions (faster than from_regex on the spec regex).
spec_names = st.lists(_component, min_size=1, max_size=6).map("/".join)


@given(st.one_of(_name_chars, spec_names, st.text(max_size=40)))
def test_accepted_names_match_spec_and_are_path_safe(name: str) -> None:
    try:
        result = validate_name(name)
    except OCIError as exc:
        assert exc.code == "NAME_INVALID"
        assert exc.status == 400
        return
    assert result == name
    assert SPEC_NAME_RE.fullmatch(name)
    assert len(name) <= 255
    for bad in ("..", "//", "%", "\\"):
        assert bad not in name
    assert not name.startswith("/") and not name.endswith("/")


@given(spec_names)
def test_every_spec_name_up_to_255_is_accepted(name: str) -> None:
    assert SPEC_NAME_RE.fullmatch(name)
    assert validate_name(name) == name


# --- tags --------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["latest", "3.19", "v1.2.3-rc.1", "_private", "A" * 128,
                                 "a" + "-" * 127, "0"])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["a" * 129, ".hidden", "-dash", "", "a/b", "a:b", "a b",
                                 "a%20b", "tag\n"])
def test_invalid_tags_raise_tag_invalid(tag: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        validate_tag(tag)
    assert _code(exc_info) == ("TAG_INVALID", 400)


def test_tag_boundary_128_vs_129() -> None:
    assert validate_tag("x" * 128) == "x" * 128
    with pytest.raises(OCIError) as exc_info:
        validate_tag("x" * 129)
    assert exc_info.value.code == "TAG_INVALID"


# --- digests -----------------------------------------------------------------------------


def test_sha256_digest_parses() -> None:
    d = Digest.parse(f"sha256:{SHA256_EMPTY}")
    assert d.algorithm == "sha256"
    assert d.hex == SHA256_EMPTY
    assert str(d) == f"sha256:{SHA256_EMPTY}"


def test_sha512_digest_parses() -> None:
    hexd = hashlib.sha512(b"").hexdigest()
    assert len(hexd) == 128
    d = Digest.parse(f"sha512:{hexd}")
    assert (d.algorithm, d.hex) == ("sha512", hexd)


@pytest.mark.parametrize(
    "value",
    [
        f"md5:{hashlib.md5(b'').hexdigest()}",  # unsupported algorithm
        f"sha256:{SHA256_EMPTY.upper()}",  # uppercase hex
        f"sha256:{SHA256_EMPTY[:63]}",  # too short
        f"sha256:{SHA256_EMPTY}0",  # too long
        f"sha512:{SHA256_EMPTY}",  # sha256 length under sha512
        f"sha256:{'g' * 64}",  # not hex
        SHA256_EMPTY,  # no algorithm
        f"SHA256:{SHA256_EMPTY}",
        f"sha256:{SHA256_EMPTY}\n",
        "sha256:",
        "",
        f"sha256:../{SHA256_EMPTY[:61]}",
    ],
)
def test_bad_digests_raise_digest_invalid(value: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        Digest.parse(value)
    assert _code(exc_info) == ("DIGEST_INVALID", 400)


def test_md5_refusal_names_the_algorithm() -> None:
    with pytest.raises(OCIError) as exc_info:
        Digest.parse(f"md5:{hashlib.md5(b'').hexdigest()}")
    assert "md5" in exc_info.value.message


_hex = "0123456789abcdef"
_valid_digests = st.one_of(
    st.text(alphabet=_hex, min_size=64, max_size=64).map(lambda h: f"sha256:{h}"),
    st.text(alphabet=_hex, min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
)


@given(_valid_digests)
def test_digest_round_trip(value: str) -> None:
    d = Digest.parse(value)
    assert str(d) == value
    assert Digest.parse(str(d)) == d


@given(st.text(max_size=150))
def test_digest_parse_only_raises_digest_invalid(value: str) -> None:
    try:
        d = Digest.parse(value)
    except OCIError as exc:
        assert exc.code == "DIGEST_INVALID"
        return
    assert str(d) == value
    assert d.algorithm in ("sha256", "sha512")


# --- references --------------------------------------------------------------------------


def test_reference_parse_tag_and_digest() -> None:
    tag_ref = Reference.parse("3.19")
    assert (tag_ref.tag, tag_ref.digest, str(tag_ref)) == ("3.19", None, "3.19")
    dig_ref = Reference.parse(f"sha256:{SHA256_EMPTY}")
    assert dig_ref.tag is None
    assert dig_ref.digest == Digest("sha256", SHA256_EMPTY)
    assert str(dig_ref) == f"sha256:{SHA256_EMPTY}"


def test_reference_with_colon_is_a_digest_and_checked_as_one() -> None:
    with pytest.raises(OCIError) as exc_info:
        Reference.parse("v1:bad")
    assert exc_info.value.code == "DIGEST_INVALID"
    with pytest.raises(OCIError) as exc_info:
        Reference.parse(".bad")
    assert exc_info.value.code == "TAG_INVALID"
