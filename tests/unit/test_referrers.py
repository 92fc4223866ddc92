"""Referrers are relayed from upstream (Distribution 2.8 has no referrers API, so a small
aiohttp upstream plays one here), with the artifactType filter passed through."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.mirror import Mirror, mirror_config

SUBJECT = "sha256:" + "ab" * 32
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def referrers_index(artifact_type: str | None) -> bytes:
    entries = [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": "sha256:" + c * 64, "size": 321, "artifactType": at}
        for c, at in (("1", "application/vnd.example.sbom"), ("2", "application/vnd.example.sig"))
        if artifact_type is None or at == artifact_type
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries}).encode()


async def test_referrers_relayed_with_artifact_type(tmp_path: Path) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    async def referrers(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.query)))
        return web.Response(body=referrers_index(request.query.get("artifactType")),
                            content_type=INDEX_TYPE)

    upstream_app = web.Application()
    upstream_app.router.add_get("/v2/{name:.+}/referrers/{digest}", referrers)
    async with TestServer(upstream_app, host="127.0.0.1") as upstream:
        raw = mirror_config(tmp_path, {"quay.io": {"url": str(upstream.make_url("")).rstrip("/")}},
                            default=None)
        async with Mirror(raw) as mirror, aiohttp.ClientSession() as http:
            url = f"{mirror.url}/v2/quay.io/acme/app/referrers/{SUBJECT}"
            async with http.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith(INDEX_TYPE)
                assert await resp.read() == referrers_index(None)
            async with http.get(url, params={"artifactType": "application/vnd.example.sig"}
                                ) as resp:
                doc = await resp.json(content_type=None)
                assert [m["digest"] for m in doc["manifests"]] == ["sha256:" + "2" * 64]
            async with http.get(f"{mirror.url}/v2/quay.io/acme/app/referrers/sha256:short"
                                ) as resp:
                assert resp.status == 400
                assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert seen == [
        (f"/v2/acme/app/referrers/{SUBJECT}", {}),
        (f"/v2/acme/app/referrers/{SUBJECT}", {"artifactType": "application/vnd.example.sig"}),
    ]
