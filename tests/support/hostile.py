"""A small registry + token realm served by aiohttp on 127.0.0.1 that misbehaves on request:
gzip bombs, oversized or dripping bodies, huge tokens, gzip whenever gzip is accepted, slow
answers. It records what reached it and how many body bytes it managed to send."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_bomb(expanded: int) -> bytes:
    """A gzip stream of ``expanded`` bytes of JSON-ish padding, a few hundred KB on the wire."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b" " * (1 << 20)
    parts = [comp.compress(b'{"token": "')]
    for _ in range(expanded // len(chunk)):
        parts.append(comp.compress(chunk))
    parts.append(comp.compress(b'"}'))
    parts.append(comp.flush())
    return b"".join(parts)


@dataclass
class Hostile:
    """What the fake does; change fields between requests."""

    realm_mode: str | None = None  # None: no auth; ok | bomb | huge_json | huge_token | drip
    manifest_mode: str = "ok"  # ok | drip | gzip (gzip when the client accepts it)
    blob_mode: str = "ok"  # ok | gzip | slow (chunks spaced by slow_gap)
    hold: float = 0.0  # seconds each blob GET waits before answering
    slow_gap: float = 0.0
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    realm_requests: list[dict[str, str]] = field(default_factory=list)
    body_bytes_sent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    realm_url: str = ""
    bomb: bytes = b""

    def add_image(self, repo: str, tag: str, layers: list[bytes]) -> tuple[str, bytes]:
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        self.blobs[sha(config)] = config
        descs = []
        for data in layers:
            self.blobs[sha(data)] = data
            descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                          "digest": sha(data), "size": len(data)})
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(config), "size": len(config)},
            "layers": descs,
        }, indent=2).encode()
        self.manifests[f"{repo}:{tag}"] = manifest
        self.manifests[f"{repo}:{sha(manifest)}"] = manifest
        return sha(manifest), manifest

    # -- token realm
    async def token(self, request: web.Request) -> web.StreamResponse:
        self.realm_requests.append({"authorization": request.headers.get("Authorization", ""),
                                    "accept-encoding": request.headers.get("Accept-Encoding",
                                                                           "")})
        mode = self.realm_mode
        if mode == "ok":
            return web.json_response({"token": "good-token", "expires_in": 300})
        if mode == "huge_token":
            return web.json_response({"token": "t" * 100 * 1024})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if mode == "bomb":
            resp.headers["Content-Encoding"] = "gzip"
        await resp.prepare(request)  # chunked: no Content-Length to refuse up front
        try:
            if mode == "bomb":
                await self._send(resp, self.bomb, 1 << 16)
            elif mode == "huge_json":
                await self._send(resp, b'{"token": "', 16)
                chunk = b"x" * (1 << 20)
                for _ in range(64):
                    await self._send(resp, chunk, 1 << 20)
            elif mode == "drip":
                for byte in b'{"token": "slow-token"}':
                    await self._send(resp, bytes([byte]), 1)
                    await asyncio.sleep(1.0)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def _send(self, resp: web.StreamResponse, data: bytes, chunk: int) -> None:
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            await resp.write(bytes(view[i:i + chunk]))
            self.body_bytes_sent += min(chunk, len(data) - i)

    # -- registry
    def _authorized(self, request: web.Request) -> bool:
        """Any token from the realm grants everything (this fake tests transport, not scope)."""
        return self.realm_mode is None or (
            request.headers.get("Authorization") == "Bearer good-token")

    async def v2(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        self.requests.append((request.method, request.path, dict(request.headers)))
        if tail == "":
            return web.json_response({})
        repo, _, rest = tail.rpartition("/")
        repo, kind = repo.rsplit("/", 1) if "/" in repo else ("", repo)
        if not self._authorized(request):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]}, status=401,
                headers={"WWW-Authenticate": f'Bearer realm="{self.realm_url}",'
                                             f'service="hostile"'})
        if kind == "manifests":
            body = self.manifests.get(f"{repo}:{rest}")
            if body is None:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            return await self._answer(request, body, self.manifest_mode,
                                      {"Content-Type": OCI_MANIFEST,
                                       "Docker-Content-Digest": sha(body)})
        if kind == "blobs":
            data = self.blobs.get(rest)
            if data is None:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.hold:
                    await asyncio.sleep(self.hold)
                return await self._answer(request, data, self.blob_mode,
                                          {"Content-Type": "application/octet-stream",
                                           "Docker-Content-Digest": rest})
            finally:
                self.in_flight -= 1
        return web.json_response({"errors": [{"code": "UNSUPPORTED"}]}, status=404)

    async def _answer(self, request: web.Request, body: bytes, mode: str,
                      headers: dict[str, str]) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        if mode == "gzip" and "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(body),
                                headers={**headers, "Content-Encoding": "gzip"})
        if mode in ("drip", "slow"):
            resp = web.StreamResponse(headers={**headers, "Content-Length": str(len(body))})
            await resp.prepare(request)
            step = 1 if mode == "drip" else max(len(body) // 5, 1)
            gap = 1.0 if mode == "drip" else self.slow_gap
            try:
                for i in range(0, len(body), step):
                    await self._send(resp, body[i:i + step], step)
                    await asyncio.sleep(gap)
            except (ConnectionError, asyncio.CancelledError):
                pass
            return resp
        return web.Response(body=body, headers=headers)


async def start_hostile(h: Hostile, realm_host: str = "127.0.0.1"
                        ) -> tuple[TestServer, TestServer]:
    """Serve the registry and its realm; returns (registry, realm) servers (started)."""
    realm_app = web.Application()
    realm_app.router.add_get("/token", h.token)
    reg_app = web.Application()
    reg_app.router.add_route("*", "/v2/{tail:.*}", h.v2)
    realm = TestServer(realm_app, host="127.0.0.1")
    reg = TestServer(reg_app, host="127.0.0.1")
    await realm.start_server()
    await reg.start_server()
    h.realm_url = f"http://{realm_host}:{realm.port}/token"
    return reg, realm


def registry_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"
