"""API keys: `Authorization: Key <id>:<secret>` or `Key <bare key>`, as both fal clients send them.

Only SHA-256 hashes of the keys are kept, compared with `secrets.compare_digest` against every key (no
early exit). Short-lived upload tokens (`/storage/auth/token`, fal-client's CDN upload) live here too.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable

from fastapi import Request

from ovi_server.api.errors import Unauthorized

ANONYMOUS = "anonymous"
_SCHEMES = ("key ", "bearer ")


def _digest(credential: str) -> bytes:
    return hashlib.sha256(credential.encode()).digest()


def key_id(key: str) -> str:
    """The public half: `id` of `id:secret`; a bare key gets a stable id derived from its hash."""
    return key.split(":", 1)[0] if ":" in key else "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyRing:
    def __init__(self, keys: Iterable[str]):
        self._keys = [(key_id(k), _digest(k)) for k in keys if k]
        seen: set[str] = set()
        for kid, _ in self._keys:
            if kid in seen:
                # The id owns requests (tenancy): two keys with one id would see each other's requests.
                raise ValueError(f"two API keys have the id {kid!r}; give each key its own id (id:secret)")
            seen.add(kid)
        self._tokens: dict[bytes, tuple[str, float]] = {}  # digest → (owner, expires at)

    @property
    def ids(self) -> list[str]:
        return [kid for kid, _ in self._keys]

    @property
    def open(self) -> bool:
        return not self._keys

    def identify(self, authorization: str | None, allow_token: bool = False) -> str:
        """The key id (the job owner) for an Authorization header; raises Unauthorized."""
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("Missing API key: send 'Authorization: Key <key_id>:<key_secret>'")
        credential = authorization.strip()
        for scheme in _SCHEMES:
            if credential.lower().startswith(scheme):
                credential = credential[len(scheme) :].strip()
                break
        digest = _digest(credential)
        owner = None
        for kid, known in self._keys:
            if secrets.compare_digest(digest, known):
                owner = kid
        if owner is None and allow_token:
            owner, expires = self._tokens.get(digest, (None, 0.0))
            if expires < time.time():
                owner = None
        if owner is None:
            raise Unauthorized(
                "Invalid API key: check FAL_KEY (or FAL_KEY_ID/FAL_KEY_SECRET) against OVI_API_KEYS"
            )
        return owner

    def issue_token(self, owner: str, ttl_s: float = 3600) -> tuple[str, float]:
        now = time.time()
        self._tokens = {d: v for d, v in self._tokens.items() if v[1] > now}
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = (owner, now + ttl_s)
        return token, now + ttl_s


def require_key(request: Request) -> str:
    """FastAPI dependency: the caller's key id."""
    return request.app.state.keys.identify(request.headers.get("authorization"))


def require_key_or_token(request: Request) -> str:
    return request.app.state.keys.identify(request.headers.get("authorization"), allow_token=True)
