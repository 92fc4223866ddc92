"""The policy enforcement point: decide a pull before anything touches the cache or upstream."""

from __future__ import annotations

import structlog
from aiohttp import web

from mirrorcache.api.services import SERVICES
from mirrorcache.auth.middleware import CLIENT_AUTH, request_identity, unauthorized
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.policy_reload import PolicyHolder
from mirrorcache.proxy.routing import Target

log = structlog.get_logger("mirrorcache.policy")

POLICY = web.AppKey("policy", PolicyHolder)


def enforce_policy(request: web.Request, target: Target, tag: str | None) -> None:
    """Raise 403 DENIED (or 401 for an anonymous caller when auth is on) if the policy in
    force refuses ``target`` (by ``tag``; by digest when None)."""
    holder = request.app.get(POLICY)
    if holder is None:
        return
    auth = request.app.get(CLIENT_AUTH)
    auth_enabled = auth is not None and auth.enabled
    identity = request_identity(request)
    decision = holder.current.decide(identity, target.upstream, target.repository, tag,
                                     auth_enabled=auth_enabled)
    if decision.allowed:
        return
    log.warning("policy.denied", identity=identity.name if identity else "anonymous",
                client=request.remote, upstream=target.upstream, repository=target.repository,
                tag=tag, rule=decision.rule_text, reason=decision.reason)
    services = request.app.get(SERVICES)
    if services is not None:
        services.metrics.policy_denied.labels(target.upstream).inc()
    if identity is None and auth is not None and auth.enabled:
        raise unauthorized(auth.realm, f"authentication required for {target}")
    what = f"{target}:{tag}" if tag is not None else str(target)
    if decision.rule_text is not None:
        message = f"pulling {what} is denied by policy {decision.rule_text}"
    else:
        message = f"{what} is not on the allowlist"
    raise OCIError(ErrorCode.DENIED, message)
