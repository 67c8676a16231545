"""Settings of the web dashboard: the `dashboard` section of a preset (DashboardConfig), plus the
credentials and secret that come from the environment when the dashboard starts.

Credentials never have defaults. Passwords are stored as PBKDF2 hashes (`emu dashboard
hash-password`), API tokens as the sha256 of the token (`emu dashboard new-token USER`). Both can
live in the preset (`users:`, `tokens:`) or, preferably, in the environment, read by
`with_environment` at startup (never at import):

    EMU_DASHBOARD_USERS="alice:pbkdf2_sha256$600000$...,bob:pbkdf2_sha256$..."
    EMU_DASHBOARD_TOKENS="<sha256 hex of the token>:ci-bot,..."
    EMU_DASHBOARD_SECRET=<random string>   # signs session cookies; else one is made per process start
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from emu.errors import ConfigError

__all__ = ["DashboardConfig", "load_config", "with_environment", "is_loopback", "USERS_ENV", "TOKENS_ENV",
           "SECRET_ENV"]

USERS_ENV = "EMU_DASHBOARD_USERS"
TOKENS_ENV = "EMU_DASHBOARD_TOKENS"
SECRET_ENV = "EMU_DASHBOARD_SECRET"

BACKENDS = ("local", "kfp")
READ_ACCESS = ("auto", "open", "login")
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class DashboardConfig:
    """The dashboard web app (`emu dashboard`)."""

    #: Address to listen on. Loopback by default: reads are then open to anyone on this machine
    #: (see read_access); bind 0.0.0.0 only behind TLS and with users configured.
    host: str = "127.0.0.1"
    #: TCP port.
    port: int = 8000
    #: Where retrains run: `local` starts `emu run` in its own process on this machine (kfp.local);
    #: `kfp` submits the compiled pipeline to `kfp_host`.
    backend: str = "local"
    #: KFP API endpoint for backend `kfp` (e.g. http://ml-pipeline.kubeflow:8888).
    kfp_host: str = ""
    #: Production mode: refuses to start without users; reads need a login too.
    production: bool = False
    #: User name -> PBKDF2 password hash (`emu dashboard hash-password`). Merged with env
    #: EMU_DASHBOARD_USERS ("alice:<hash>,bob:<hash>"; the environment wins for a name in both).
    users: dict[str, str] = field(default_factory=dict)
    #: sha256 (hex) of an API token -> user name (`emu dashboard new-token USER`). Merged with env
    #: EMU_DASHBOARD_TOKENS ("<sha256>:<user>,..."). Tokens authenticate `Authorization: Bearer`.
    tokens: dict[str, str] = field(default_factory=dict)
    #: Who may read pages: `auto` = anyone when bound to a loopback address outside production mode,
    #: else logged-in users only; `open` = anyone; `login` = logged-in users only.
    read_access: str = "auto"
    #: Hours a login session lasts.
    session_hours: float = 12.0
    #: Mark the session cookie Secure (browsers then send it over HTTPS only): set when serving
    #: behind TLS.
    cookie_secure: bool = False
    #: Extra presets (YAML paths) offered on the retrain and schedule forms besides configs/*.yaml.
    presets: list[str] = field(default_factory=list)
    #: Failed logins from one client address for one user name within 15 minutes after which that
    #: client's further attempts for that name are refused until the window passes (other clients,
    #: the real user among them, can still log in).
    max_failed_logins: int = 5
    #: Folders on this machine whose shard datasets a retrain may train on (a folder inside one of
    #: them); none: retrains take only s3:// URIs and DVC md5s.
    data_roots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"dashboard.port must be 1..65535, got {self.port}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"dashboard.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "kfp" and not self.kfp_host:
            raise ConfigError("dashboard.kfp_host must name the KFP endpoint when dashboard.backend is kfp")
        if self.read_access not in READ_ACCESS:
            raise ConfigError(f"dashboard.read_access must be one of {', '.join(READ_ACCESS)}, "
                              f"got {self.read_access!r}")
        if not self.session_hours > 0:
            raise ConfigError(f"dashboard.session_hours must be > 0, got {self.session_hours}")
        if self.max_failed_logins < 1:
            raise ConfigError(f"dashboard.max_failed_logins must be >= 1, got {self.max_failed_logins}")
        from emu.dashboard.auth import check_password_hash

        for name, encoded in self.users.items():
            if not _USER_NAME.fullmatch(name):
                raise ConfigError(f"dashboard.users: user name {name!r} must be 1-64 letters, digits or ._@-")
            check_password_hash(encoded, f"dashboard.users.{name}")
        for digest, user in self.tokens.items():
            if not _SHA256.fullmatch(digest):
                raise ConfigError("dashboard.tokens: keys must be the sha256 hex digest of a token "
                                  "(`emu dashboard new-token USER` prints one), not the token itself")
            if not _USER_NAME.fullmatch(str(user)):
                raise ConfigError(f"dashboard.tokens: user name {user!r} must be 1-64 letters, digits or ._@-")

    @property
    def reads_need_login(self) -> bool:
        if self.read_access == "open":
            return False
        if self.read_access == "login":
            return True
        return self.production or not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: addresses no other machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> DashboardConfig:
    """The `dashboard` section of `preset` (none: the defaults) with `key=value` overrides."""
    from emu.config import resolve

    return resolve(DashboardConfig, "dashboard", preset, overrides)


def with_environment(config: DashboardConfig, environ: Mapping[str, str] | None = None) -> DashboardConfig:
    """`config` with the users and tokens of EMU_DASHBOARD_USERS / EMU_DASHBOARD_TOKENS added (read
    now: call at startup)."""
    environ = os.environ if environ is None else environ
    users = dict(config.users)
    users.update(_pairs(environ.get(USERS_ENV, ""), USERS_ENV, "user:hash"))
    tokens = dict(config.tokens)
    tokens.update({digest.lower(): user for digest, user in _pairs(environ.get(TOKENS_ENV, ""), TOKENS_ENV,
                                                                   "sha256:user").items()})
    return dataclasses.replace(config, users=users, tokens=tokens)


def _pairs(text: str, variable: str, form: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        left, sep, right = item.partition(":")
        if not sep or not left.strip() or not right.strip():
            raise ConfigError(f"{variable}: each comma-separated entry must be {form}; got an entry "
                              f"starting {item[:12]!r}")
        out[left.strip()] = right.strip()
    return out
