"""Who may act on the dashboard: the token (a login form's signed cookie, HTTP basic with the token as the
password, or `Authorization: Bearer`), the CSRF checks of every unsafe request, and the bind check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request

SESSION_COOKIE = "dbsched_session"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
NO_TOKEN = (
    "actions are disabled: this dashboard has no token; set dbsched_web_token (or DBSCHED_WEB_TOKEN) and restart "
    "`celery -A proj dbsched web`"
)


@dataclass(frozen=True)
class Identity:
    """Who a request is from: `user` (a name for the logs), `via` (cookie, basic, bearer), and the `session`
    its CSRF token is bound to."""

    user: str
    via: str
    session: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Auth:
    """The token's checks. Without a token the dashboard is read-only and nobody is identified."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        # Sessions are signed with a key derived from the token: a new token ends every session.
        self._key = hashlib.sha256(b"celery_dbsched.web session\0" + token.encode()).digest() if token else b""

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def is_token(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def session_cookie(self, user: str) -> str:
        """A signed cookie value naming `user`, valid for SESSION_SECONDS."""
        data = {"u": user, "n": secrets.token_urlsafe(12), "e": int(time.time()) + SESSION_SECONDS}
        payload = _b64(json.dumps(data).encode())
        return f"{payload}.{self._sign(payload)}"

    def _from_cookie(self, value: str) -> Identity | None:
        payload, _, signature = value.partition(".")
        if not signature or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(data, dict) or int(data.get("e", 0)) < time.time():
            return None
        return Identity(str(data.get("u") or "operator"), "cookie", str(data.get("n")))

    def identify(self, request: Request) -> Identity | None:
        """The request's identity, or None (no token configured, or no valid credentials)."""
        if not self.enabled:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.is_token(value.strip()):
            return Identity("token", "bearer", "bearer")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except ValueError:
                return None
            return Identity(user or "basic", "basic", f"basic:{user}") if self.is_token(password) else None
        cookie = request.cookies.get(SESSION_COOKIE)
        return self._from_cookie(cookie) if cookie else None

    def csrf_token(self, identity: Identity | None) -> str:
        """The CSRF token of the identity's session (empty without one)."""
        return "" if identity is None else self._sign("csrf:" + identity.session)

    def csrf_ok(self, identity: Identity, given: str | None) -> bool:
        """A bearer client is no browser (it sends its token itself); the others prove the page sent it."""
        return identity.via == "bearer" or (given is not None and hmac.compare_digest(given, self.csrf_token(identity)))


def cross_site(request: Request) -> str | None:
    """Why an unsafe request looks cross-site (a browser's Sec-Fetch-Site, or an Origin that is not this
    site), or None."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {fetch_site}"
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
        if origin != own:
            return f"Origin {origin} is not {own}"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """ValueError when the dashboard would serve beyond this machine without authentication."""
    if token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve the dashboard on {host} without authentication: set dbsched_web_token (or "
            "DBSCHED_WEB_TOKEN), or bind a loopback address (--host 127.0.0.1)"
        )
