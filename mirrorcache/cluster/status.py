"""``mirrorcache cluster status``: the members, their health, and who owns a digest or an
image reference (probed from where the command runs)."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from mirrorcache.cluster import hrw
from mirrorcache.cluster.membership import Membership
from mirrorcache.config import Config
from mirrorcache.errors import OCIError
from mirrorcache.oci.reference import Digest, is_digest
from mirrorcache.proxy.owners import blob_key, manifest_key, tag_key
from mirrorcache.proxy.routing import Router


def keys_for(config: Config, what: str) -> list[tuple[str, str]]:
    """(label, ownership key) pairs for a digest (as blob and as manifest) or an image
    reference (``name:tag`` -> its tag revalidation; ``name@digest`` -> the manifest)."""
    if is_digest(what):
        d = str(Digest.parse(what))
        return [("blob", blob_key(d)), ("manifest", manifest_key(d))]
    name, _, digest = what.partition("@")
    tag = "latest"
    if not digest and name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    target = Router(config.upstreams, config.default_upstream).resolve(name)
    if digest:
        return [("manifest", manifest_key(str(Digest.parse(digest))))]
    return [("tag", tag_key(target.upstream, target.repository, tag))]


async def status(config: Config, what: str | None) -> dict[str, object]:
    async with aiohttp.ClientSession() as session:
        m = Membership(config.cluster, session, scheme="https" if config.tls else "http")
        if config.cluster.dns is not None:
            await m.resolve()
        members = m.configured()
        probes = await asyncio.gather(*(m.probe(x) for x in members))
    healthy = [x for x, (ok, _) in zip(members, probes, strict=True) if ok]
    out: dict[str, object] = {
        "self": config.cluster.self_address,
        "members": [{"member": x, "healthy": ok, "error": err}
                    for x, (ok, err) in zip(members, probes, strict=True)],
    }
    if what:
        out["owners"] = [{"of": label, "key": key, "owner": hrw.owner(key, healthy),
                          "owner_if_all_healthy": hrw.owner(key, members)}
                         for label, key in keys_for(config, what)]
    return out


def render(doc: dict[str, object]) -> str:
    lines = []
    for mem in doc["members"]:  # type: ignore[attr-defined]
        mark = "healthy" if mem["healthy"] else f"UNHEALTHY ({mem['error']})"
        me = "  (self)" if mem["member"] == doc["self"] else ""
        lines.append(f"{mem['member']:<28} {mark}{me}")
    for o in doc.get("owners", []):  # type: ignore[attr-defined]
        extra = ("" if o["owner"] == o["owner_if_all_healthy"]
                 else f" (would be {o['owner_if_all_healthy']} if all were healthy)")
        lines.append(f"owner of {o['key']}: {o['owner'] or 'nobody healthy'}{extra}")
    return "\n".join(lines)


def run(config: Config, what: str | None, as_json: bool) -> int:
    if not config.cluster.enabled:
        print("not clustered: cluster.peers is not set")
        return 1
    try:
        doc = asyncio.run(status(config, what))
    except OCIError as exc:
        print(f"error: {exc.message}")
        return 2
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    members = doc["members"]
    return 0 if all(m["healthy"] for m in members) else 1  # type: ignore[attr-defined]
