"""Which token realms an upstream may send us to, and with what.

An upstream's bearer challenge names the URL (the realm) the mirror fetches a token from. A
hostile or compromised upstream could name any URL: a host that collects our credentials, an
``http://`` downgrade, or a service inside our network whose answer we would forward. So:

* **Credentials** (the upstream's username/password, as Basic) go to a realm only if it is
  ``https`` (or ``http`` when the upstream itself is configured as plain ``http``) **and** on
  the upstream's own registrable domain (``auth.docker.io`` for ``registry-1.docker.io``,
  ``quay.io``, ``ghcr.io``, ``gcr.io``, ``<name>.azurecr.io`` on the same name), or it is
  listed in the upstream's ``token_realms``.
* **Anonymous** token fetches (no credentials configured, so nothing of ours is sent) may go
  to a foreign realm, since some public registries use one (``nvcr.io`` ->
  ``authn.nvidia.com``), but with the same scheme rule, and never to ``localhost`` or a
  loopback, link-local, private or unspecified IP literal unless the upstream itself is such a
  host: otherwise the upstream could make the mirror fetch from inside its network and forward
  the answer (as the bearer token) to the upstream.

The registrable domain is the last two DNS labels, or three when the last two are a known
multi-label public suffix (``co.uk``) or a multi-tenant hosting suffix (``azurecr.io``, where
each tenant owns a subdomain). An IP literal or single-label host is its own domain. This is a
deliberately small rule instead of the full Public Suffix List: it can only make the mirror
*refuse* a realm it should have trusted (fixed by listing it in ``token_realms``), never
trust a tenant of a listed suffix.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Suffixes under which each next label belongs to a different owner.
MULTI_LABEL_SUFFIXES = frozenset({
    # country second-level domains
    "co.uk", "org.uk", "ac.uk", "gov.uk", "me.uk", "com.au", "net.au", "org.au", "co.nz",
    "co.jp", "ne.jp", "or.jp", "co.kr", "com.br", "com.cn", "com.tw", "com.sg", "co.in",
    "co.za", "com.mx", "com.tr",
    # multi-tenant registry and hosting suffixes
    "azurecr.io", "azurecr.cn", "amazonaws.com", "cloudfront.net", "appspot.com",
    "herokuapp.com", "github.io", "gitlab.io", "pages.dev", "workers.dev", "fly.dev",
    "onrender.com", "vercel.app", "netlify.app",
})


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def registrable_domain(host: str) -> str:
    """``auth.docker.io`` -> ``docker.io``; ``x.y.co.uk`` -> ``y.co.uk``; IPs stay whole."""
    host = host.lower().rstrip(".")
    if _ip(host) is not None:
        return host
    labels = host.split(".")
    if len(labels) >= 3 and ".".join(labels[-2:]) in MULTI_LABEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def is_internal(host: str) -> bool:
    """A host that names the mirror's own machine or network, not the internet."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _ip(host)
    return ip is not None and (ip.is_loopback or ip.is_link_local or ip.is_private
                               or ip.is_unspecified or ip.is_reserved or ip.is_multicast)


@dataclass(frozen=True, slots=True)
class RealmPolicy:
    """The realm rule for one upstream (see the module docstring)."""

    upstream_url: str
    token_realms: tuple[str, ...] = ()

    def _listed(self, realm: str) -> str | None:
        """``"url"`` when a listed URL prefix covers the realm, ``"host"`` when a listed host
        names its host, else None."""
        parts = urlsplit(realm)
        host = (parts.hostname or "").lower()
        netloc = parts.netloc.rsplit("@", 1)[-1].lower()
        for entry in self.token_realms:
            if "://" in entry:
                base = entry.rstrip("/")
                if realm == entry or realm.startswith((base + "/", base + "?")):
                    return "url"
            elif entry.lower() in (host, netloc):
                return "host"
        return None

    def refusal(self, realm: str, *, credentials: bool) -> str | None:
        """None when the realm may be asked (with credentials if ``credentials``), else why
        not, in words for the error message and the log."""
        up = urlsplit(self.upstream_url)
        parts = urlsplit(realm)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            return "the realm is not an http(s) URL"
        listed = self._listed(realm)
        if listed == "url":
            return None  # the operator named this exact URL, scheme included
        if parts.scheme != "https" and up.scheme == "https":
            return "the realm is plain http while the upstream is https"
        if listed == "host":
            return None
        up_host = (up.hostname or "").lower()
        same = registrable_domain(host) == registrable_domain(up_host)
        if credentials and not same:
            return (f"the realm host {host} is not on the upstream's domain "
                    f"{registrable_domain(up_host)}; list it in token_realms to trust it")
        if not same and is_internal(host) and not is_internal(up_host):
            return f"the realm host {host} is an internal address"
        return None


def address_class(host: str) -> str | None:
    """Which internal kind of address ``host`` names ("loopback", "link-local", "private",
    "reserved"), or None for a public address or DNS name."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    ip = _ip(host)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified or ip.is_reserved or ip.is_multicast:
        return "reserved"
    if ip.is_private:
        return "private"
    return None


def redirect_refusal(upstream_url: str, from_url: str, to_url: str) -> str | None:
    """None when an upstream's redirect from ``from_url`` to ``to_url`` may be followed, else
    why not. The realm rule, for every hop: no https -> http downgrade, and no internal
    address (loopback, link-local, private, reserved) unless the upstream itself is one of
    the same kind, so a compromised upstream cannot make the mirror fetch (and cache, and
    serve) something from inside its network, such as a cloud metadata service."""
    src, dst = urlsplit(from_url), urlsplit(to_url)
    host = (dst.hostname or "").lower()
    if dst.scheme not in ("http", "https") or not host:
        return "the redirect is not to an http(s) URL"
    if src.scheme == "https" and dst.scheme != "https":
        return "the redirect downgrades https to plain http"
    kind = address_class(host)
    if kind is not None and kind != address_class(urlsplit(upstream_url).hostname or ""):
        return f"the redirect goes to {host}, a {kind} address"
    return None
