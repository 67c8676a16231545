"""Dashboard credentials and settings: password hashes, API token digests, signed session cookies,
the login throttle, audit sanitising (emu/dashboard/auth.py) and DashboardConfig with its
environment merge (emu/dashboard/config.py)."""

import base64
import hashlib
import json
import time
import types

import pytest

from emu.dashboard import auth
from emu.dashboard.auth import (MIN_ITERATIONS, LoginThrottle, Session, SessionSigner, check_password_hash,
                                hash_password, new_token, sanitize, token_digest, verify_password)
from emu.dashboard.config import TOKENS_ENV, USERS_ENV, DashboardConfig, is_loopback, with_environment
from emu.errors import ConfigError

FAST = 200_000  # the minimum accepted; keeps each hash around a tenth of a second


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("correct horse", iterations=FAST)


@pytest.fixture(scope="module")
def bob_hash() -> str:
    return hash_password("battery staple", iterations=FAST)


def weak_hash(password: str, iterations: int) -> str:
    """A well-formed hash with too few iterations, made without hash_password (which refuses it)."""
    salt = b"0123456789abcdef"
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# ---------------------------------------------------------------------- passwords


def test_hash_round_trip(alice_hash):
    assert alice_hash.startswith(f"pbkdf2_sha256${FAST}$")
    assert "correct horse" not in alice_hash
    check_password_hash(alice_hash)  # well formed and strong enough
    assert verify_password("correct horse", alice_hash) is True
    assert verify_password("correct horse ", alice_hash) is False
    assert verify_password("Correct horse", alice_hash) is False
    assert verify_password("", alice_hash) is False


def test_hash_is_standard_pbkdf2_with_a_fresh_salt():
    salt = bytes(range(16))
    encoded = hash_password("pw", iterations=FAST, salt=salt)
    _, iterations, salt_b64, digest_b64 = encoded.split("$")
    assert int(iterations) == FAST and base64.b64decode(salt_b64) == salt
    assert base64.b64decode(digest_b64) == hashlib.pbkdf2_hmac("sha256", b"pw", salt, FAST)
    # Without a given salt, each hash of the same password is different (random salt) and both verify.
    first, second = hash_password("pw", iterations=FAST), hash_password("pw", iterations=FAST)
    assert first != second
    assert verify_password("pw", first) and verify_password("pw", second)


def test_unknown_user_is_refused(monkeypatch):
    assert verify_password("anything", None) is False
    # Not even the password of the stand-in hash that an unknown user is checked against gets in.
    monkeypatch.setattr(auth, "_DUMMY_HASH", hash_password("dummy", iterations=FAST))
    assert verify_password("dummy", auth._DUMMY_HASH) is True
    assert verify_password("dummy", None) is False


@pytest.mark.parametrize("password, iterations, message", [("", FAST, "empty"), ("x" * 1025, FAST, "1024"),
                                                            ("pw", MIN_ITERATIONS - 1, "iterations")])
def test_hash_password_refuses(password, iterations, message):
    with pytest.raises(ConfigError, match=message):
        hash_password(password, iterations=iterations)


def test_a_weak_hash_is_refused_even_with_the_right_password():
    weak = weak_hash("pw", 1_000)
    with pytest.raises(ConfigError, match="1000 PBKDF2 iterations.*at least 200000"):
        check_password_hash(weak, "dashboard.users.alice")
    assert verify_password("pw", weak) is False
    # The same construction at the minimum is accepted: it is the iteration count that is refused.
    strong = weak_hash("pw", MIN_ITERATIONS)
    check_password_hash(strong)
    assert verify_password("pw", strong) is True


@pytest.mark.parametrize("pasted", ["hunter2", "pbkdf2_sha256$600000$onlythree", "sha1$600000$c2FsdA==$aGFzaA==",
                                    "pbkdf2_sha256$many$c2FsdA==$aGFzaA==", "pbkdf2_sha256$600000$not*b64$x",
                                    ""])
def test_plain_text_pasted_as_a_hash_is_refused_with_a_hint(pasted):
    with pytest.raises(ConfigError) as err:
        check_password_hash(pasted, "dashboard.users.alice")
    assert "dashboard.users.alice" in str(err.value)
    assert "emu dashboard hash-password" in str(err.value)
    assert verify_password(pasted, pasted) is False


def test_a_hash_with_a_short_digest_is_refused():
    salt, digest = base64.b64encode(b"saltsalt").decode(), base64.b64encode(b"short").decode()
    with pytest.raises(ConfigError, match="wrong length"):
        check_password_hash(f"pbkdf2_sha256$600000${salt}${digest}")


def test_token_digest_is_sha256_hex():
    token = new_token()
    assert len(token) >= 43 and token != new_token()
    assert token_digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------------- sessions


def session(user: str | None = "alice", expires_in: float = 3600.0) -> Session:
    return Session(user=user, csrf="csrf-token", sid="sid-1", expires=float(int(time.time() + expires_in)))


def test_session_round_trip():
    signer = SessionSigner("s3cret")
    for original in (session(), session(user=None), Session.new("bob", 60)):
        loaded = signer.loads(signer.dumps(original))
        assert loaded is not None
        assert (loaded.user, loaded.csrf, loaded.sid) == (original.user, original.csrf, original.sid)
        assert loaded.expires == int(original.expires)
    # Another signer with the same secret (e.g. after a restart) accepts the cookie.
    assert SessionSigner("s3cret").loads(signer.dumps(session())) == session()


def test_new_sessions_are_unique():
    a, b = Session.new(None, 60), Session.new(None, 60)
    assert a.csrf != b.csrf and a.sid != b.sid
    assert a.expires > time.time()


def test_a_tampered_payload_is_refused():
    signer = SessionSigner("s3cret")
    payload, signature = signer.dumps(session(user="mallory")).split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert data["u"] == "mallory"
    data["u"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")
    assert signer.loads(f"{forged}.{signature}") is None


def test_a_tampered_signature_is_refused():
    signer = SessionSigner("s3cret")
    cookie = signer.dumps(session())
    payload, signature = cookie.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert signer.loads(cookie) is not None
    assert signer.loads(f"{payload}.{flipped}") is None
    assert signer.loads(f"{payload}.") is None
    assert signer.loads(payload) is None


def test_a_cookie_signed_with_another_secret_is_refused():
    cookie = SessionSigner("one secret").dumps(session())
    assert SessionSigner("another secret").loads(cookie) is None
    assert SessionSigner(b"one secret").loads(cookie) is not None, "str and bytes secrets are the same key"


@pytest.mark.parametrize("cookie", [None, "", "no-dot", "a.b.c", "x" * 5000 + "." + "y"])
def test_malformed_cookies_are_refused(cookie):
    assert SessionSigner("s3cret").loads(cookie) is None


def test_an_expired_session_is_refused():
    signer = SessionSigner("s3cret")
    assert signer.loads(signer.dumps(session(expires_in=-5))) is None
    assert signer.loads(signer.dumps(session(expires_in=+60))) is not None


def test_a_revoked_session_is_refused_and_others_are_not():
    signer = SessionSigner("s3cret")
    mine = Session.new("alice", 3600)
    other = Session.new("alice", 3600)
    cookie, other_cookie = signer.dumps(mine), signer.dumps(other)
    assert signer.loads(cookie) is not None
    signer.revoke(mine)
    assert signer.revoked(mine.sid) and not signer.revoked(other.sid)
    assert signer.loads(cookie) is None
    assert signer.loads(other_cookie) is not None


def test_an_empty_secret_is_refused():
    with pytest.raises(ConfigError, match="secret"):
        SessionSigner("")


@pytest.mark.parametrize("cookie", ["\u00e9.abc", "abc.\u00e9"])
def test_a_non_ascii_cookie_is_refused(cookie):
    assert SessionSigner("s3cret").loads(cookie) is None


# ---------------------------------------------------------------------- login throttle


def test_throttle_counts_attempts_per_client_and_user():
    throttle = LoginThrottle(limit=3)
    assert all(throttle.acquire("10.0.0.9", "alice") for _ in range(3))
    assert not throttle.acquire("10.0.0.9", "alice"), "the fourth attempt is refused before any password check"
    assert throttle.acquire("10.0.0.1", "alice"), "another client (the real user) is not locked out"
    assert throttle.acquire("10.0.0.9", "bob"), "per user name too"
    throttle.succeeded("10.0.0.1", "alice")
    assert not throttle.acquire("10.0.0.9", "alice"), "a success elsewhere does not free the guesser"


def test_throttle_is_atomic_under_concurrency():
    import threading

    throttle = LoginThrottle(limit=5)
    granted, barrier = [], threading.Barrier(50)

    def attempt():
        barrier.wait()
        granted.append(throttle.acquire("10.0.0.9", "alice"))

    threads = [threading.Thread(target=attempt) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert granted.count(True) == 5


def test_throttle_memory_is_bounded():
    throttle = LoginThrottle(limit=2, max_keys=100)
    for i in range(1000):
        throttle.acquire("10.0.0.9", f"user{i}")
    assert len(throttle) == 100
    assert throttle.acquire("10.0.0.9", "user999") and not throttle.acquire("10.0.0.9", "user999"), \
        "the most recent keys keep their counts"


def test_throttle_forgets_attempts_older_than_the_window(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    throttle = LoginThrottle(limit=2, window_s=900)
    assert throttle.acquire("c", "alice")
    clock[0] += 600
    assert throttle.acquire("c", "alice")
    assert not throttle.acquire("c", "alice")
    clock[0] += 301  # the first attempt is now 901 s old
    assert throttle.acquire("c", "alice")
    assert not throttle.acquire("c", "alice")
    clock[0] += 901
    assert throttle.acquire("c", "alice")


# ---------------------------------------------------------------------- audit sanitising


def test_sanitize_redacts_secrets_at_any_depth():
    request = {"method": "POST", "path": "/login", "client": None,
               "fields": {"user": "alice", "password": "hunter2", "csrf_token": "c", "New-Password": "p2",
                          "preset": "configs/tiny.yaml", "steps": 5,
                          "deeper": {"client_secret": "s", "API_TOKEN": "t", "keep": "k"}},
               "Authorization": "Bearer x"}
    original = json.loads(json.dumps(request))
    clean = sanitize(request)
    assert clean == {"method": "POST", "path": "/login", "client": None, "Authorization": "[redacted]",
                     "fields": {"user": "alice", "password": "[redacted]", "csrf_token": "[redacted]",
                                "New-Password": "[redacted]", "preset": "configs/tiny.yaml", "steps": 5,
                                "deeper": {"client_secret": "[redacted]", "API_TOKEN": "[redacted]", "keep": "k"}}}
    assert request == original, "the request itself is not changed"
    assert "hunter2" not in json.dumps(clean)


def test_sanitize_cuts_long_values():
    clean = sanitize({"note": "x" * 5000, "short": "y" * 2000, "n": 10 ** 30, "items": ["z" * 3000] * 500})
    assert clean["note"] == "x" * auth.MAX_VALUE_CHARS + "..."
    assert clean["short"] == "y" * 2000
    assert clean["n"] == 10 ** 30
    assert len(clean["items"]) == 200 and clean["items"][0] == "z" * auth.MAX_VALUE_CHARS + "..."


def test_sanitize_redacts_secrets_inside_lists():
    assert "hunter2" not in json.dumps(sanitize({"items": [{"user": "a", "password": "hunter2"}]}))


# ---------------------------------------------------------------------- DashboardConfig


def test_defaults_are_valid_and_open_on_loopback():
    config = DashboardConfig()
    assert config.host == "127.0.0.1" and config.users == {} and config.tokens == {}
    assert config.reads_need_login is False


@pytest.mark.parametrize("kwargs, field", [
    ({"port": 0}, "dashboard.port"), ({"port": 65536}, "dashboard.port"), ({"port": -80}, "dashboard.port"),
    ({"backend": "airflow"}, "dashboard.backend"),
    ({"backend": "kfp"}, "dashboard.kfp_host"),
    ({"read_access": "public"}, "dashboard.read_access"),
    ({"session_hours": 0}, "dashboard.session_hours"), ({"session_hours": float("nan")}, "dashboard.session_hours"),
    ({"max_failed_logins": 0}, "dashboard.max_failed_logins"),
    ({"tokens": {"my-raw-token": "alice"}}, "dashboard.tokens"),
    ({"tokens": {"A" * 64: "alice"}}, "dashboard.tokens"),
    ({"tokens": {"a" * 63: "alice"}}, "dashboard.tokens"),
    ({"tokens": {"a" * 64: "bad user"}}, "dashboard.tokens"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DashboardConfig(**kwargs)


@pytest.mark.parametrize("name", ["", "-alice", ".x", "a b", "al:ice", "x" * 65, "al/ice", "é"])
def test_bad_user_names_are_refused(name, alice_hash):
    with pytest.raises(ConfigError, match="dashboard.users.*user name"):
        DashboardConfig(users={name: alice_hash})


def test_good_settings_are_accepted(alice_hash):
    digest = token_digest("tok")
    config = DashboardConfig(host="0.0.0.0", port=65535, backend="kfp", kfp_host="http://kfp:8888",
                             users={"alice": alice_hash, "bob.smith@example.com": alice_hash, "x" * 64: alice_hash},
                             tokens={digest: "ci-bot"})
    assert config.tokens == {digest: "ci-bot"} and len(config.users) == 3


def test_a_plain_password_in_users_is_refused_naming_the_user():
    with pytest.raises(ConfigError, match=r"dashboard\.users\.alice.*emu dashboard hash-password"):
        DashboardConfig(users={"alice": "hunter2"})
    with pytest.raises(ConfigError, match=r"dashboard\.users\.alice.*iterations"):
        DashboardConfig(users={"alice": weak_hash("pw", 10_000)})


@pytest.mark.parametrize("host, production, read_access, need_login", [
    ("127.0.0.1", False, "auto", False),
    ("localhost", False, "auto", False),
    ("::1", False, "auto", False),
    ("127.0.0.1", True, "auto", True),
    ("0.0.0.0", False, "auto", True),
    ("192.168.1.5", False, "auto", True),
    ("0.0.0.0", False, "open", False),
    ("0.0.0.0", True, "open", False),
    ("127.0.0.1", False, "login", True),
    ("0.0.0.0", False, "login", True),
])
def test_reads_need_login(host, production, read_access, need_login):
    assert DashboardConfig(host=host, production=production, read_access=read_access).reads_need_login is need_login


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("LocalHost", True),
                                            ("10.0.0.1", False), ("0.0.0.0", False), ("::", False),
                                            ("example.com", False), ("", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_with_environment_merges_users_and_tokens(alice_hash, bob_hash):
    ci, other = token_digest("ci-token"), token_digest("other-token")
    config = DashboardConfig(users={"alice": bob_hash, "carol": bob_hash}, tokens={other: "carol"})
    merged = with_environment(config, {USERS_ENV: f" alice:{alice_hash} ,bob:{bob_hash},, ",
                                       TOKENS_ENV: f"{ci.upper()}:ci-bot"})
    assert merged.users == {"alice": alice_hash, "bob": bob_hash, "carol": bob_hash}, "the environment wins"
    assert merged.tokens == {other: "carol", ci: "ci-bot"}, "digests are lower-cased"
    assert config.users == {"alice": bob_hash, "carol": bob_hash} and config.tokens == {other: "carol"}
    assert verify_password("correct horse", merged.users["alice"])


def test_with_environment_reads_only_the_given_mapping(monkeypatch, alice_hash):
    monkeypatch.setenv(USERS_ENV, "not a valid entry")
    config = DashboardConfig(users={"alice": alice_hash})
    assert with_environment(config, {}).users == {"alice": alice_hash}
    with pytest.raises(ConfigError, match=USERS_ENV):
        with_environment(config)  # None: the process environment


@pytest.mark.parametrize("variable, value", [(USERS_ENV, "alice"), (USERS_ENV, ":hash"), (USERS_ENV, "alice: "),
                                             (TOKENS_ENV, "abcdef"), (TOKENS_ENV, f"{'a' * 64}:"),
                                             (TOKENS_ENV, f"good:{'a' * 64},broken")])
def test_with_environment_rejects_malformed_entries_naming_the_variable(variable, value):
    with pytest.raises(ConfigError, match=variable):
        with_environment(DashboardConfig(), {variable: value})


def test_with_environment_validates_what_it_merges():
    with pytest.raises(ConfigError, match=r"dashboard\.users\.alice.*hash-password"):
        with_environment(DashboardConfig(), {USERS_ENV: "alice:hunter2"})
    with pytest.raises(ConfigError, match=r"dashboard\.tokens"):
        with_environment(DashboardConfig(), {TOKENS_ENV: "raw-token-not-digest:ci-bot"})
