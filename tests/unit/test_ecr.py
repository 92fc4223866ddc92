"""ECR credentials against moto's ECR (a separate server process), counted at a proxy."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

from mirrorcache.config import ConfigError, EcrConfig, parse_config
from mirrorcache.errors import OCIError
from mirrorcache.upstream.ecr import MIN_TOKEN_LIFETIME, EcrCredentials, parse_ecr_host
from tests.support.countingproxy import CountingProxy
from tests.support.s3server import MotoServer, aws_session

ACCOUNT = "123456789012"
OTHER_ACCOUNT = "210987654321"


def token_calls(proxy: CountingProxy) -> int:
    return sum(1 for r in proxy.requests
               if r.headers.get("X-Amz-Target", "").endswith("GetAuthorizationToken"))


@pytest.fixture
async def ecr_proxy(moto_server: MotoServer) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(moto_server.url) as proxy:
        yield proxy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(proxy: CountingProxy, registry_id: str = ACCOUNT, clock: Clock | None = None
           ) -> EcrCredentials:
    cfg = EcrConfig(registry_id=registry_id, region="us-east-1", endpoint_url=proxy.url)
    return EcrCredentials("ecr.test", cfg, aws_session(), clock=clock or Clock())


def decode(header: str) -> str:
    assert header.startswith("Basic ")
    return base64.b64decode(header[6:]).decode()


async def test_token_is_basic_aws_password_cross_account(ecr_proxy: CountingProxy) -> None:
    header = await source(ecr_proxy, OTHER_ACCOUNT).basic()
    assert header is not None
    assert decode(header) == f"AWS:{OTHER_ACCOUNT}-auth-token"  # moto's password for that id
    assert token_calls(ecr_proxy) == 1


async def test_past_expiry_is_floored_and_fetches_are_single_flight(
        ecr_proxy: CountingProxy) -> None:
    clock = Clock()
    creds = source(ecr_proxy, clock=clock)
    # moto's expiresAt is 2015-01-01: without the floor every call would fetch
    headers = await asyncio.gather(*(creds.basic() for _ in range(20)))
    assert len(set(headers)) == 1 and token_calls(ecr_proxy) == 1
    clock.now += MIN_TOKEN_LIFETIME - 1
    await creds.basic()
    assert token_calls(ecr_proxy) == 1
    clock.now += 2
    await creds.basic()
    assert token_calls(ecr_proxy) == 2 and creds.calls == 2


async def test_a_refusal_forces_one_refresh_for_all_concurrent_refusals(
        ecr_proxy: CountingProxy) -> None:
    clock = Clock()
    creds = source(ecr_proxy, clock=clock)
    await creds.basic()
    clock.now += 1
    refused_since = clock.now
    clock.now += 1
    await asyncio.gather(*(creds.basic(refused_since=refused_since) for _ in range(10)))
    assert token_calls(ecr_proxy) == 2
    # a later refusal of the refreshed header refreshes again, once
    refused_since = clock.now
    clock.now += 1
    await asyncio.gather(*(creds.basic(refused_since=refused_since) for _ in range(5)))
    assert token_calls(ecr_proxy) == 3


async def test_unreachable_ecr_is_unavailable(moto_server: MotoServer) -> None:
    async with CountingProxy(moto_server.url) as proxy:
        url = proxy.url
    cfg = EcrConfig(registry_id=ACCOUNT, region="us-east-1", endpoint_url=url)
    with pytest.raises(OCIError) as err:
        await EcrCredentials("ecr.test", cfg, aws_session()).basic()
    assert (err.value.code, err.value.status) == ("UNAVAILABLE", 503)


def test_ecr_hosts() -> None:
    assert parse_ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com") == (
        "123456789012", "eu-west-1")
    assert parse_ecr_host("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com") == (
        "123456789012", "us-gov-west-1")
    assert parse_ecr_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn") == (
        "123456789012", "cn-north-1")
    assert parse_ecr_host("public.ecr.aws") is None
    assert parse_ecr_host("12345.dkr.ecr.eu-west-1.amazonaws.com") is None
    assert parse_ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.com") is None


def cfg_with(upstream: dict[str, object], name: str = "ecr.example.com") -> object:
    return parse_config({"upstreams": {name: upstream}}, {})


def test_ecr_config() -> None:
    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    up = cfg_with({"url": f"https://{host}"}, host).upstreams[host]  # type: ignore[attr-defined]
    assert up.type == "ecr"
    assert up.ecr == EcrConfig(registry_id="123456789012", region="eu-west-1")
    up = cfg_with({"url": "http://127.0.0.1:5000", "type": "ecr",  # type: ignore[attr-defined]
                   "registry_id": OTHER_ACCOUNT, "region": "us-east-1",
                   "endpoint_url": "http://127.0.0.1:9"}).upstreams["ecr.example.com"]
    assert up.ecr == EcrConfig(OTHER_ACCOUNT, "us-east-1", "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as err:
        cfg_with({"url": "https://x.example.com", "type": "ecr", "registry_id": "12",
                  "username": "AWS", "password": "p"})
    assert err.value.problems == [
        "upstreams.ecr.example.com.type: an ECR upstream gets its credentials from "
        "GetAuthorizationToken: remove username/password",
        "upstreams.ecr.example.com.registry_id: expected a 12-digit AWS account id",
        "upstreams.ecr.example.com.region: is required",
    ]
    with pytest.raises(ConfigError) as err:
        cfg_with({"url": "https://x.example.com", "registry_id": ACCOUNT, "type": "docker"})
    assert err.value.problems == [
        "upstreams.ecr.example.com.type: expected one of registry, ecr",
        "upstreams.ecr.example.com.registry_id: only for type: ecr",
    ]
