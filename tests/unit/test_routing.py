"""Routing the three client forms (bare, ?ns=, host prefix) to one Target."""

from __future__ import annotations

import pytest

from mirrorcache.errors import OCIError
from mirrorcache.proxy.routing import RESOLVED_MEMO, Router, Target

UPSTREAMS = {"docker.io": object(), "quay.io": object(), "localhost:5000": object()}
ALPINE = Target("docker.io", "library/alpine")


@pytest.fixture
def router() -> Router:
    return Router(UPSTREAMS, "docker.io")


def test_bare_single_component_goes_to_default_with_library(router: Router) -> None:
    assert router.resolve("alpine") == ALPINE


def test_bare_namespaced_name_goes_to_default(router: Router) -> None:
    assert router.resolve("library/alpine") == ALPINE
    assert router.resolve("bitnami/redis") == Target("docker.io", "bitnami/redis")


@pytest.mark.parametrize("name", ["library/alpine", "alpine"])
def test_ns_docker_io(router: Router, name: str) -> None:
    assert router.resolve(name, ns="docker.io") == ALPINE


@pytest.mark.parametrize("alias", ["registry-1.docker.io", "index.docker.io",
                                   "registry.hub.docker.com", "Docker.IO"])
def test_ns_docker_hub_aliases_are_docker_io(router: Router, alias: str) -> None:
    assert router.resolve("library/alpine", ns=alias) == ALPINE


def test_ns_quay(router: Router) -> None:
    assert router.resolve("prometheus/node-exporter", ns="quay.io") == Target(
        "quay.io", "prometheus/node-exporter")


def test_prefix_quay(router: Router) -> None:
    assert router.resolve("quay.io/prometheus/node-exporter") == Target(
        "quay.io", "prometheus/node-exporter")


def test_prefix_docker_io_single_component_gets_library(router: Router) -> None:
    assert router.resolve("docker.io/alpine") == ALPINE
    assert router.resolve("docker.io/library/alpine") == ALPINE


def test_prefix_docker_hub_alias(router: Router) -> None:
    assert router.resolve("registry-1.docker.io/library/alpine") == ALPINE
    assert router.resolve("index.docker.io/alpine") == ALPINE


def test_prefix_localhost_with_port(router: Router) -> None:
    t = router.resolve("localhost:5000/x")
    assert t == Target("localhost:5000", "x")
    assert str(t) == "localhost:5000/x"


def test_non_docker_single_component_gets_no_library(router: Router) -> None:
    assert router.resolve("x", ns="quay.io") == Target("quay.io", "x")


def test_three_forms_give_equal_targets(router: Router) -> None:
    forms = [
        router.resolve("alpine"),
        router.resolve("library/alpine"),
        router.resolve("library/alpine", ns="docker.io"),
        router.resolve("alpine", ns="index.docker.io"),
        router.resolve("docker.io/library/alpine"),
        router.resolve("docker.io/alpine"),
    ]
    assert all(t == ALPINE for t in forms)
    assert len(set(forms)) == 1
    quay = {
        router.resolve("prometheus/node-exporter", ns="quay.io"),
        router.resolve("quay.io/prometheus/node-exporter"),
    }
    assert quay == {Target("quay.io", "prometheus/node-exporter")}


def test_unknown_ns_is_name_unknown_naming_the_host(router: Router) -> None:
    with pytest.raises(OCIError) as exc_info:
        router.resolve("library/alpine", ns="evil.example")
    err = exc_info.value
    assert (err.code, err.status) == ("NAME_UNKNOWN", 404)
    assert "evil.example" in err.message
    assert err.body()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_unknown_prefix_is_name_unknown_naming_the_host(router: Router) -> None:
    with pytest.raises(OCIError) as exc_info:
        router.resolve("ghcr.io/x")
    err = exc_info.value
    assert (err.code, err.status) == ("NAME_UNKNOWN", 404)
    assert "ghcr.io" in err.message


def test_unknown_localhost_port_is_name_unknown(router: Router) -> None:
    with pytest.raises(OCIError) as exc_info:
        router.resolve("localhost:5001/x")
    assert (exc_info.value.code, exc_info.value.status) == ("NAME_UNKNOWN", 404)
    assert "localhost:5001" in exc_info.value.message


@pytest.mark.parametrize("ns", ["a b", "x/../y", "quay.io/x", "", "-bad.io", "a..b",
                                "host:port", "quay.io%2f", "h" * 300])
def test_junk_ns_is_name_invalid(router: Router, ns: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        router.resolve("library/alpine", ns=ns)
    assert (exc_info.value.code, exc_info.value.status) == ("NAME_INVALID", 400)


@pytest.mark.parametrize("name", ["quay.io/../x", "Library/alpine", "quay.io/", "a//b",
                                  "docker.io/-x"])
def test_invalid_repository_after_routing_is_name_invalid(router: Router, name: str) -> None:
    with pytest.raises(OCIError) as exc_info:
        router.resolve(name)
    assert exc_info.value.code == "NAME_INVALID"


def test_no_default_and_bare_name_is_name_unknown() -> None:
    router = Router(UPSTREAMS, None)
    for name in ("alpine", "library/alpine"):
        with pytest.raises(OCIError) as exc_info:
            router.resolve(name)
        assert (exc_info.value.code, exc_info.value.status) == ("NAME_UNKNOWN", 404)
    # Explicit forms still work without a default.
    assert router.resolve("quay.io/a/b") == Target("quay.io", "a/b")
    assert router.resolve("a/b", ns="quay.io") == Target("quay.io", "a/b")


def test_non_docker_default_upstream_adds_no_library() -> None:
    router = Router(UPSTREAMS, "quay.io")
    assert router.resolve("alpine") == Target("quay.io", "alpine")


def test_target_records_the_route_form_but_not_in_its_identity() -> None:
    router = Router({"docker.io": object(), "quay.io": object()}, "docker.io")
    forms = [router.resolve("a/b").form, router.resolve("a/b", ns="docker.io").form,
             router.resolve("docker.io/a/b").form]
    assert forms == ["default", "ns", "prefix"]
    assert len({router.resolve("a/b"), router.resolve("a/b", ns="docker.io"),
                router.resolve("docker.io/a/b")}) == 1


def test_remembered_names_resolve_as_the_first_time(router: Router) -> None:
    """The memo changes nothing: the same Target (and route form) for every form, again and
    again; a refused name is refused every time; the memo stays bounded."""
    for _ in range(3):
        assert router.resolve("alpine") == ALPINE
        assert router.resolve("alpine").form == "default"
        assert router.resolve("alpine", ns="docker.io").form == "ns"
        assert router.resolve("docker.io/alpine").form == "prefix"
        with pytest.raises(OCIError) as exc_info:
            router.resolve("UPPER/case")
        assert exc_info.value.code == "NAME_INVALID"
        with pytest.raises(OCIError) as exc_info:
            router.resolve("x", ns="ghcr.io")
        assert exc_info.value.code == "NAME_UNKNOWN"
    for i in range(RESOLVED_MEMO + 10):
        assert router.resolve(f"r{i}") == Target("docker.io", f"library/r{i}")
    assert len(router._resolved) <= RESOLVED_MEMO
