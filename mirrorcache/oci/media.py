"""Manifest media types and Accept handling."""

from __future__ import annotations

import json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES: tuple[str, ...] = (
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
)
#: What we ask an upstream for when no client Accept is known.
DEFAULT_ACCEPT = ", ".join(MANIFEST_TYPES)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def sniff_media_type(body: bytes) -> str:
    """Best-effort media type of a manifest from its own ``mediaType`` field."""
    try:
        doc = json.loads(body)
    except ValueError:
        return OCI_MANIFEST
    if isinstance(doc, dict):
        mt = doc.get("mediaType")
        if isinstance(mt, str) and mt:
            return mt
        if doc.get("schemaVersion") == 1:
            return DOCKER_MANIFEST_V1_SIGNED
        if "manifests" in doc:
            return OCI_INDEX
    return OCI_MANIFEST


def declared_media_type(body: bytes) -> str | None:
    """The manifest's own ``mediaType`` field, if it has one (what the bytes say they are)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict):
        mt = doc.get("mediaType")
        if isinstance(mt, str) and mt:
            return mt
    return None


def accepts(accept_header: str | None, media_type: str) -> bool:
    """Whether a client's Accept header admits ``media_type`` (no header admits anything)."""
    if not accept_header:
        return True
    for part in accept_header.split(","):
        value = part.split(";", 1)[0].strip().lower()
        if value in ("*/*", media_type.lower(), "application/*"):
            return True
    return False
