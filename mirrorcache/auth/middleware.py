"""The client-authentication middleware: who is calling, or a 401/429 before anything else.

With ``auth.enabled`` off every request is anonymous and nothing is checked. With it on:

* wrong or malformed credentials: ``401 UNAUTHORIZED`` with ``WWW-Authenticate: Basic``
  (logged as ``auth.failed`` and counted against the client address);
* an address over its failed-login budget: ``429 TOOMANYREQUESTS`` with ``Retry-After`` for
  any request carrying credentials (logged as ``auth.rate_limited``). Each attempt is
  counted *before* its check and given back when it succeeds, so concurrent wrong
  passwords cannot all slip through: at most ``max_failed_logins`` are ever checked;
* too many bcrypt checks queued over all addresses: ``429`` too (``auth.overloaded``);
* no credentials on the ``/v2/`` ping: ``401`` with the challenge, so ``docker login`` and
  clients that hold credentials learn to send them;
* no credentials elsewhere: the request goes on as anonymous and the policy decides (an
  anonymous caller refused by policy gets the 401 challenge, not 403, so containerd, which
  does not ping ``/v2/`` first, retries with its credentials).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiohttp import web

from mirrorcache.api.keys import IDENTITY_KEY
from mirrorcache.auth.authenticator import (
    Authenticator,
    BadCredentials,
    Overloaded,
    parse_authorization,
)
from mirrorcache.auth.identity import Identity
from mirrorcache.auth.limiter import FailedLoginLimiter
from mirrorcache.errors import ErrorCode, Handler, OCIError

log = structlog.get_logger("mirrorcache.auth")


@dataclass(frozen=True)
class ClientAuth:
    """Everything the middleware needs, hung off the app under :data:`CLIENT_AUTH`."""

    enabled: bool
    realm: str
    authenticator: Authenticator
    limiter: FailedLoginLimiter


CLIENT_AUTH = web.AppKey("client_auth", ClientAuth)


def unauthorized(realm: str, message: str = "authentication required") -> OCIError:
    """The 401 every client understands as "send your credentials"."""
    return OCIError(ErrorCode.UNAUTHORIZED, message,
                    headers={"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'})


def request_identity(request: web.Request) -> Identity | None:
    """The caller's identity (None: anonymous), as set by :func:`client_auth_middleware`."""
    identity = request.get(IDENTITY_KEY)
    return identity if isinstance(identity, Identity) else None


def _is_ping(path: str) -> bool:
    return path in ("/v2", "/v2/")


@web.middleware
async def client_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app.get(CLIENT_AUTH)
    request[IDENTITY_KEY] = None
    if auth is None or not auth.enabled or not request.path.startswith("/v2"):
        return await handler(request)
    address = request.remote or "unknown"
    header = request.headers.get("Authorization")
    try:
        creds = parse_authorization(header)
    except BadCredentials as exc:
        auth.limiter.failure(address)
        _failed(request, address, exc)
        raise unauthorized(auth.realm, "invalid credentials") from None
    if creds is not None:
        wait = auth.limiter.reserve(address)
        if wait is not None:
            log.warning("auth.rate_limited", client=address, retry_after=round(wait, 1))
            raise _too_many(wait, "too many failed logins from this address")
        try:
            request[IDENTITY_KEY] = await auth.authenticator.verify(creds)
        except BadCredentials as exc:
            _failed(request, address, exc)  # the reserved attempt stays counted
            raise unauthorized(auth.realm, "invalid credentials") from None
        except Overloaded as exc:
            auth.limiter.release(address)
            log.warning("auth.overloaded", client=address, reason=str(exc))
            raise _too_many(1.0, "too many logins in progress") from None
        except BaseException:
            auth.limiter.release(address)  # cancelled (client gone): not a failed login
            raise
        auth.limiter.release(address)
    if request[IDENTITY_KEY] is None and _is_ping(request.path):
        raise unauthorized(auth.realm)
    return await handler(request)


def _failed(request: web.Request, address: str, exc: BadCredentials) -> None:
    log.warning("auth.failed", client=address, user=(exc.user or "")[:128],
                reason=exc.reason, path=request.path[:256])


def _too_many(wait: float, message: str) -> OCIError:
    seconds = max(int(wait + 0.999), 1)
    return OCIError(ErrorCode.TOOMANYREQUESTS, f"{message}; retry in {seconds}s",
                    headers={"Retry-After": str(seconds)})
