"""Generate test images (OCI or Docker schema 2, single- or multi-arch) and push them.

Everything is built in memory: each :class:`Blob`, :class:`Image` and :class:`Index` knows
its exact bytes and ``digest``, so tests can compare what came out of a registry (or out of
mirrorcache) byte for byte. Pushing uses the registry HTTP API with aiohttp
(:class:`RegistryClient`), including Docker token auth (401 + ``WWW-Authenticate: Bearer``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import re
import secrets
import tarfile
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from yarl import URL

from tests.support.tokenserver import TokenServer

Media = Literal["oci", "docker"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: Accept header that asks for any of the manifest types built here.
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

#: ``auth`` for pushes: a TokenServer (its ``require_basic`` creds are used), or Basic creds.
Auth = TokenServer | tuple[str, str] | None


def basic_auth_header(user: str, password: str) -> str:
    """``Basic <base64(user:password)>`` (aiohttp.BasicAuth is deprecated in newer aiohttp)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def sha256_digest(data: bytes) -> str:
    """``"sha256:" + hex`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob (layer or config)."""

    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """A single-platform image: config blob, layer blobs and the manifest bytes."""

    manifest: bytes
    media_type: str
    config: Blob
    layers: tuple[Blob, ...]
    platform: dict[str, str]
    diff_ids: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Config and layers (the config first)."""
        return (self.config, *self.layers)

    @property
    def blob_digests(self) -> set[str]:
        return {b.digest for b in self.blobs}

    @property
    def manifests(self) -> tuple[Image, ...]:
        """Uniform with :attr:`Index.manifests`: the image itself."""
        return (self,)


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list over :class:`Image` children."""

    manifest: bytes
    media_type: str
    manifests: tuple[Image, ...]

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """All distinct blobs of all children."""
        seen: dict[str, Blob] = {}
        for img in self.manifests:
            for b in img.blobs:
                seen.setdefault(b.digest, b)
        return tuple(seen.values())

    @property
    def blob_digests(self) -> set[str]:
        return {b.digest for b in self.blobs}

    def child(self, architecture: str) -> Image:
        """The child image for ``architecture``."""
        for img in self.manifests:
            if img.platform.get("architecture") == architecture:
                return img
        raise KeyError(architecture)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False).encode()


def _tar_gz_layer(rng: random.Random, size: int, index: int) -> tuple[bytes, str]:
    """Gzipped tar holding one random file of ``size`` bytes; returns (blob, diff_id)."""
    payload = rng.randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/layer{index}-{rng.getrandbits(32):08x}.bin")
        info.size = size
        info.mtime = 1_700_000_000
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256_digest(tar_bytes)


def make_image(
    layers: list[int],
    media: Media = "oci",
    *,
    arch: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    seed: int | None = None,
    raw: bool = False,
    annotations: dict[str, str] | None = None,
) -> Image:
    """Build an image with one layer per entry of ``layers`` (payload sizes in bytes).

    Layers are ``tar+gzip`` of one random file (fine up to a few MiB); ``raw=True`` makes each
    layer exactly ``size`` random bytes instead (not a valid tarball; for big benchmark blobs).
    ``seed=None`` gives fresh random content; a fixed seed makes the image reproducible.
    """
    rng = random.Random(secrets.randbits(64) if seed is None else seed)
    layer_type = OCI_LAYER if media == "oci" else DOCKER_LAYER
    blobs: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layers):
        if raw:
            data = rng.randbytes(size)
            diff_id = sha256_digest(data)
        else:
            data, diff_id = _tar_gz_layer(rng, size, i)
        blobs.append(Blob(data, layer_type))
        diff_ids.append(diff_id)
    platform = {"architecture": arch, "os": os}
    if variant:
        platform["variant"] = variant
    config_doc: dict[str, Any] = {
        **platform,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"seed": str(rng.getrandbits(64))}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "mirrorcache tests"}],
    }
    config = Blob(_canonical(config_doc), OCI_CONFIG if media == "oci" else DOCKER_CONFIG)
    manifest_type = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in blobs],
    }
    if annotations:
        doc["annotations"] = annotations
    return Image(
        manifest=_canonical(doc),
        media_type=manifest_type,
        config=config,
        layers=tuple(blobs),
        platform=platform,
        diff_ids=tuple(diff_ids),
    )


def make_index(images: list[Image], media: Media = "oci") -> Index:
    """Build an OCI index (``media="oci"``) or Docker manifest list over ``images``."""
    index_type = OCI_INDEX if media == "oci" else DOCKER_LIST
    doc = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            {
                "mediaType": img.media_type,
                "digest": img.digest,
                "size": img.size,
                "platform": img.platform,
            }
            for img in images
        ],
    }
    return Index(manifest=_canonical(doc), media_type=index_type, manifests=tuple(images))


def make_multiarch(
    layers: list[int],
    media: Media = "oci",
    arches: tuple[str, ...] = ("amd64", "arm64"),
    *,
    seed: int | None = None,
) -> Index:
    """Convenience: one image per architecture (distinct content) wrapped in an index."""
    base = secrets.randbits(32) if seed is None else seed
    images = [make_image(layers, media, arch=a, seed=base * 1000 + i) for i, a in enumerate(arches)]
    return make_index(images, media)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str) -> dict[str, str] | None:
    """Parse ``Bearer realm="..",service="..",scope=".."`` into a dict (None if not Bearer)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return {k.lower(): v for k, v in _CHALLENGE_PARAM.findall(rest)}


class RegistryClient:
    """Minimal registry v2 client with Docker token auth, for pushing/pulling in tests.

    ``auth`` is a :class:`TokenServer` (anonymous, or its ``require_basic`` credentials) or
    ``(user, password)`` sent as Basic to the token realm. On a 401 with a Bearer challenge
    it fetches a token for ``repository:<repo>:pull,push`` and retries once.
    """

    def __init__(self, registry_url: str, *, auth: Auth = None) -> None:
        self.base = URL(registry_url)
        if isinstance(auth, TokenServer):
            self.creds = auth.require_basic
        else:
            self.creds = auth
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, str] = {}
        self._use_basic = False  # the registry asked for Basic auth (htpasswd)
        self.token_fetches = 0

    async def __aenter__(self) -> RegistryClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=120), auto_decompress=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use `async with RegistryClient(...)`")
        return self._session

    async def _fetch_token(self, challenge: dict[str, str], repo: str) -> str:
        params = [("service", challenge.get("service", ""))]
        params.append(("scope", f"repository:{repo}:pull,push"))
        headers = {"Authorization": basic_auth_header(*self.creds)} if self.creds else {}
        self.token_fetches += 1
        async with self.session.get(challenge["realm"], params=params, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"token fetch failed {resp.status}: {await resp.text()}")
            body = await resp.json(content_type=None)
        return str(body.get("token") or body["access_token"])

    async def request(
        self,
        method: str,
        url: str | URL,
        repo: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send a request (absolute URL or path), handling the token dance.

        Returns ``(status, headers, body)``; headers are a plain dict (last value wins).
        """
        target = url if isinstance(url, URL) else URL(url, encoded=True)
        if not target.is_absolute():
            target = self.base.join(target)
        for attempt in range(2):
            hdrs = dict(headers or {})
            if repo in self._tokens:
                hdrs["Authorization"] = f"Bearer {self._tokens[repo]}"
            elif self._use_basic and self.creds:
                hdrs["Authorization"] = basic_auth_header(*self.creds)
            async with self.session.request(
                method, target, data=data, headers=hdrs, allow_redirects=False
            ) as resp:
                body = await resp.read()
                resp_headers = dict(resp.headers)
                status = resp.status
            challenge = parse_bearer_challenge(resp_headers.get("WWW-Authenticate", ""))
            if status == 401 and challenge and "realm" in challenge and attempt == 0:
                self._tokens[repo] = await self._fetch_token(challenge, repo)
                continue
            basic = resp_headers.get("WWW-Authenticate", "").lower().startswith("basic")
            if status == 401 and basic and self.creds and not self._use_basic:
                self._use_basic = True
                continue
            return status, resp_headers, body
        raise AssertionError("unreachable")

    async def blob_exists(self, repo: str, digest: str) -> bool:
        status, _, _ = await self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo)
        return status == 200

    async def push_blob(self, repo: str, blob: Blob) -> bool:
        """Upload ``blob`` monolithically unless present; returns True if it was uploaded."""
        if await self.blob_exists(repo, blob.digest):
            return False
        status, hdrs, body = await self.request("POST", f"/v2/{repo}/blobs/uploads/", repo)
        if status != 202:
            raise RuntimeError(f"upload start for {repo} failed: {status} {body!r}")
        location = hdrs["Location"]
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}digest={quote(blob.digest, safe='')}"
        status, _, body = await self.request(
            "PUT",
            put_url,
            repo,
            data=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise RuntimeError(f"upload of {blob.digest} to {repo} failed: {status} {body!r}")
        return True

    async def put_manifest(self, repo: str, reference: str, manifest: bytes, media: str) -> str:
        """PUT a manifest by tag or digest; returns the registry's Docker-Content-Digest."""
        status, hdrs, body = await self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            repo,
            data=manifest,
            headers={"Content-Type": media},
        )
        if status != 201:
            raise RuntimeError(f"manifest PUT {repo}:{reference} failed: {status} {body!r}")
        return hdrs.get("Docker-Content-Digest", "")

    async def get_manifest(self, repo: str, reference: str) -> tuple[int, dict[str, str], bytes]:
        """GET a manifest with an Accept header for every type built here."""
        return await self.request(
            "GET", f"/v2/{repo}/manifests/{reference}", repo, headers={"Accept": MANIFEST_ACCEPT}
        )

    async def get_blob(self, repo: str, digest: str) -> tuple[int, dict[str, str], bytes]:
        return await self.request("GET", f"/v2/{repo}/blobs/{digest}", repo)

    async def push(self, repo: str, obj: Image | Index, tag: str | None) -> None:
        """Push all blobs, child manifests by digest, then ``obj`` by tag (or digest)."""
        for blob in obj.blobs:
            await self.push_blob(repo, blob)
        if isinstance(obj, Index):
            for child in obj.manifests:
                await self.put_manifest(repo, child.digest, child.manifest, child.media_type)
        got = await self.put_manifest(repo, tag or obj.digest, obj.manifest, obj.media_type)
        if got and got != obj.digest:
            raise RuntimeError(f"registry computed digest {got}, expected {obj.digest}")


async def push_image(
    registry_url: str,
    repo: str,
    image: Image | Index,
    tag: str | None = "latest",
    *,
    auth: Auth = None,
) -> None:
    """Push ``image`` (an :class:`Image` or :class:`Index`) to ``registry_url``/``repo``."""
    async with RegistryClient(registry_url, auth=auth) as client:
        await client.push(repo, image, tag)
