"""Passwords, API tokens, signed session cookies, CSRF tokens and request sanitising (stdlib only).

- Passwords: PBKDF2-HMAC-SHA256 with a random 16-byte salt per password and 600,000 iterations
  (OWASP's 2023 figure for PBKDF2-SHA256), stored as `pbkdf2_sha256$<iterations>$<salt>$<hash>`
  (base64). Hashes with fewer than 200,000 iterations are refused. Verification compares in
  constant time, and a login for an unknown user does the same work as for a known one.
- API tokens: random URL-safe strings; the dashboard keeps only their sha256.
- Sessions: `<payload>.<signature>` where the payload is base64url JSON {user, csrf, session id,
  expiry} and the signature HMAC-SHA256 under the dashboard's secret. Stateless; logout revokes
  the session id for the life of the process and clears the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emu.errors import ConfigError

__all__ = ["hash_password", "verify_password", "check_password_hash", "new_token", "token_digest", "Session",
           "SessionSigner", "LoginThrottle", "sanitize", "PBKDF2_ITERATIONS", "MIN_ITERATIONS"]

ALGORITHM = "pbkdf2_sha256"
PBKDF2_ITERATIONS = 600_000
MIN_ITERATIONS = 200_000
SALT_BYTES = 16
#: Passwords longer than this are refused before hashing (PBKDF2 hashes long inputs once per
#: iteration block, so huge passwords are a cheap way to burn the server's CPU).
MAX_PASSWORD_CHARS = 1024


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """A PBKDF2-SHA256 hash of `password` with a fresh random salt, as one string."""
    if not password:
        raise ConfigError("the password must not be empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ConfigError(f"the password must be at most {MAX_PASSWORD_CHARS} characters")
    if iterations < MIN_ITERATIONS:
        raise ConfigError(f"PBKDF2 needs at least {MIN_ITERATIONS} iterations, got {iterations}")
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{ALGORITHM}${iterations}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, bytes, bytes]:
    algorithm, iterations, salt, digest = encoded.split("$")
    if algorithm != ALGORITHM:
        raise ValueError(algorithm)
    return int(iterations), _unb64(salt), _unb64(digest)


def check_password_hash(encoded: str, where: str = "password hash") -> None:
    """Refuse a malformed or weak stored hash (ConfigError naming `where`), e.g. a plain password
    pasted where its hash belongs."""
    try:
        iterations, salt, digest = _parse(str(encoded))
    except (ValueError, TypeError):
        raise ConfigError(f"{where} is not a password hash (expected {ALGORITHM}$<iterations>$<salt>$<hash>; "
                          f"make one with `emu dashboard hash-password`)") from None
    if iterations < MIN_ITERATIONS:
        raise ConfigError(f"{where} uses {iterations} PBKDF2 iterations; at least {MIN_ITERATIONS} are required")
    if len(salt) < 8 or len(digest) != 32:
        raise ConfigError(f"{where}: salt or hash has the wrong length")


#: Compared against when the user does not exist, so that unknown and known names take equally long.
_DUMMY_HASH = (f"{ALGORITHM}${PBKDF2_ITERATIONS}${base64.b64encode(bytes(SALT_BYTES)).decode()}$"
               f"{base64.b64encode(bytes(32)).decode()}")


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether `password` matches `encoded` (constant-time comparison). None (an unknown user)
    does the same work and returns False."""
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        iterations, salt, expected = _parse(encoded if encoded is not None else _DUMMY_HASH)
    except (ValueError, TypeError):
        return False
    if iterations < MIN_ITERATIONS:
        return False
    actual = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(actual, expected) and encoded is not None


def new_token() -> str:
    """A fresh API token (256 random bits)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the dashboard stores of a token: its sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Session:
    """A browser session: anonymous (user None) until login. `csrf` is the token every form of the
    session carries; `sid` identifies the session for revocation."""

    user: str | None
    csrf: str
    sid: str
    expires: float

    @staticmethod
    def new(user: str | None, lifetime_s: float) -> Session:
        return Session(user=user, csrf=secrets.token_urlsafe(32), sid=secrets.token_urlsafe(16),
                       expires=time.time() + lifetime_s)


class SessionSigner:
    """Signs and checks session cookies with HMAC-SHA256 under `secret`."""

    def __init__(self, secret: str | bytes) -> None:
        if not secret:
            raise ConfigError("the session secret must not be empty")
        self._key = hashlib.sha256(b"emu-dashboard-session:" + (secret.encode() if isinstance(secret, str)
                                                                  else secret)).digest()
        self._revoked: dict[str, float] = {}
        self._lock = threading.Lock()

    def dumps(self, session: Session) -> str:
        payload = _b64(json.dumps({"u": session.user, "c": session.csrf, "s": session.sid, "e": int(session.expires)},
                                  separators=(",", ":")).encode(), url=True)
        return f"{payload}.{self._sign(payload)}"

    def loads(self, cookie: str | None) -> Session | None:
        """The session of a cookie, or None if it is missing, tampered with, expired or revoked."""
        if not cookie or not cookie.isascii() or cookie.count(".") != 1 or len(cookie) > 4096:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload, url=True))
            session = Session(user=data["u"], csrf=str(data["c"]), sid=str(data["s"]), expires=float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.user is not None and not isinstance(session.user, str):
            return None
        if session.expires < time.time() or self.revoked(session.sid):
            return None
        return session

    def revoke(self, session: Session) -> None:
        with self._lock:
            now = time.time()
            self._revoked = {sid: until for sid, until in self._revoked.items() if until > now}
            self._revoked[session.sid] = session.expires

    def revoked(self, sid: str) -> bool:
        with self._lock:
            return sid in self._revoked

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest(), url=True)


class LoginThrottle:
    """At most `limit` login attempts per (client address, user name) within `window_s` unless one
    succeeds; then that client is refused for that name until the window has passed.

    An attempt is counted (`acquire`) *before* its password is checked, in one step under a lock:
    fifty concurrent guesses cannot all be checked against a limit of five. The key holds the
    client address, so a guesser locks out itself, not the real user logging in from elsewhere
    (per user name alone the throttle is a denial of service). At most `max_keys` keys are kept,
    the least recently tried dropped first: a flood of made-up names cannot grow memory without
    bound (a dropped key only forgets a few failures; the PBKDF2 cost still slows each guess).
    """

    def __init__(self, limit: int, window_s: float = 900.0, max_keys: int = 10_000) -> None:
        self.limit, self.window_s, self.max_keys = limit, window_s, max_keys
        self._attempts: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, client: str, user: str) -> bool:
        """Count an attempt of `client` for `user`; False (nothing counted) when it is over the limit."""
        key = (client, user)
        with self._lock:
            recent = self._recent(key)
            if len(recent) >= self.limit:
                self._attempts[key] = recent
                return False
            self._attempts[key] = recent + [time.monotonic()]
            self._attempts.move_to_end(key)
            while len(self._attempts) > self.max_keys:
                self._attempts.popitem(last=False)
            return True

    def succeeded(self, client: str, user: str) -> None:
        """The password was right: this client's count for `user` starts again."""
        with self._lock:
            self._attempts.pop((client, user), None)

    def __len__(self) -> int:
        return len(self._attempts)

    def _recent(self, key: tuple[str, str]) -> list[float]:
        cutoff = time.monotonic() - self.window_s
        return [t for t in self._attempts.get(key, []) if t > cutoff]


# ---------------------------------------------------------------------- audit requests

#: Request fields never written to the audit log (any key containing one of these words).
SECRET_WORDS = ("password", "passwd", "token", "csrf", "secret", "authorization", "cookie", "session", "api_key",
                "apikey", "credential")
MAX_VALUE_CHARS = 2000


def sanitize(request: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a request's fields fit for the audit log: secrets dropped (replaced by
    "[redacted]"), long values cut."""
    out: dict[str, Any] = {}
    for key, value in request.items():
        if any(word in str(key).lower() for word in SECRET_WORDS):
            out[str(key)] = "[redacted]"
        elif isinstance(value, Mapping):
            out[str(key)] = sanitize(value)
        elif isinstance(value, (list, tuple)):
            out[str(key)] = [sanitize(v) if isinstance(v, Mapping) else _cut(v) for v in value[:200]]
        else:
            out[str(key)] = _cut(value)
    return out


def _cut(value: Any) -> Any:
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _b64(data: bytes, url: bool = False) -> str:
    return (base64.urlsafe_b64encode(data).decode().rstrip("=") if url else base64.b64encode(data).decode())


def _unb64(text: str, url: bool = False) -> bytes:
    if url:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return base64.b64decode(text, validate=True)
