"""HTTPS serving: skopeo verifies the mirror's certificate against a private test CA."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mirrorcache.config import ConfigError, TlsConfig
from mirrorcache.tls import server_ssl_context
from tests.support.countingproxy import CountingProxy
from tests.support.images import make_image, push_image
from tests.support.mirror import mirror_config
from tests.support.registry import RegistryProcess
from tests.support.secure import TestCA, TlsMirror, write_htpasswd
from tests.support.skopeo import SkopeoError, copied_blob_digests, manifest_digest, skopeo_copy

pytestmark = pytest.mark.integration

CREDS = ("ci", "ci-password")


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
async def hub(registry: RegistryProcess) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(registry.url) as proxy:
        yield proxy


async def test_https_pull_with_private_ca(tmp_path: Path, ca: TestCA, hub: CountingProxy,
                                          registry: RegistryProcess) -> None:
    repo = f"library/t{uuid.uuid4().hex[:10]}"
    img = make_image([4000, 8000], media="docker")
    await push_image(registry.url, repo, img, "v1")
    htpasswd = write_htpasswd(tmp_path / "htpasswd", dict([CREDS]))
    raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}}, tls=ca.tls_config,
                        auth={"enabled": True, "htpasswd": str(htpasswd)},
                        policy={"rules": [{"allow": "docker.io/library/*"}]})
    hub.reset()
    async with TlsMirror(raw) as mirror:
        cert_dir = ["--src-cert-dir", str(ca.cert_dir)]
        out = await skopeo_copy(f"{mirror.host}/{repo}:v1", tmp_path / "a", creds=CREDS,
                                tls_verify=True, extra=cert_dir)
        assert manifest_digest(out.dest_dir) == img.digest
        assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
        assert hub.count("GET", "blob") == len(img.blob_digests)

        hub.reset()
        # Without trusting the CA, verification fails before any request is made.
        with pytest.raises(SkopeoError) as err:
            await skopeo_copy(f"{mirror.host}/{repo}:v1", tmp_path / "b", creds=CREDS,
                              tls_verify=True)
        assert "certificate" in err.value.stderr
        # Trusted, but no credentials: the policy grants nothing anonymously.
        with pytest.raises(SkopeoError):
            await skopeo_copy(f"{mirror.host}/{repo}:v1", tmp_path / "c", tls_verify=True,
                              extra=cert_dir)
        # A plain-HTTP client on the TLS port gets nowhere.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://{mirror.host}/v2/"):
                    pass
            client_ctx = ssl.create_default_context(cafile=str(ca.ca_file))
            async with http.get(f"{mirror.url}/v2/", ssl=client_ctx) as resp:
                assert resp.status == 401
        assert hub.requests == []


def test_server_context(tmp_path: Path, ca: TestCA) -> None:
    assert server_ssl_context(None) is None
    ctx = server_ssl_context(TlsConfig(ca.cert, ca.key))
    assert ctx is not None and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="cannot load certificate"):
        server_ssl_context(TlsConfig(ca.cert, ca.cert))
