"""Replicas that act as one cache (issue 12).

``hrw.py`` (rendezvous ownership, pure), ``signing.py`` (the peer HMAC), ``membership.py``
(who the members are, their health, static list or DNS), ``client.py`` (asking the owner:
a blob body, a manifest; falling back to upstream), ``endpoint.py`` (the internal
``/_mirrorcache/peer/v1/`` routes the owner answers). Wired in ``app.py`` only.
"""
