"""Login -> groups through a real OpenID Connect flow, with a real hub and its proxy.

A stand-in OIDC provider that signs runs in this test process (a real HTTP server on 127.0.0.1; a mock
only because an internet identity provider cannot be reached here): ``/authorize`` logs in the user the
test picked beforehand and redirects back with a code, ``/token`` exchanges the code (client secret and
PKCE checked) for an access token and an ID token signed with RS256 by the provider's own RSA key,
``/jwks`` publishes that key (``/.well-known/openid-configuration`` names it), ``/userinfo`` returns the
picked claims. The workbench is started by ``workbench up`` with a platform YAML whose ``auth`` is
``generic-oauth`` pointing at that provider, with ``jwks_url`` and ``issuer`` so the hub verifies each ID
token's signature, issuer and audience; a browser-like ``requests.Session`` follows the redirects
``/hub/oauth_login`` -> provider -> ``/hub/oauth_callback``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
import requests
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from workbench.auth.oauth import NOT_ENTITLED

from .harness import DEMO, Workbench

pytestmark = pytest.mark.integration

CLIENT_ID = "workbench-hub"
CLIENT_SECRET = secrets.token_urlsafe(16)
SECRET_ENV = "WORKBENCH_TEST_OIDC_SECRET"


class Provider:
    """A minimal OIDC provider: authorization code flow with PKCE, userinfo, RS256-signed ID tokens, JWKS."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "stand-in-key-1"
        #: what the next ID token gets wrong (set by a test): {"key": another private key, "iss": ..., "aud": ...}
        self.forge: dict = {}
        self.claims: dict | None = None  # who logs in next (set by the test before each login)
        self.redirect_uri = ""  # the hub's registered callback
        self.codes: dict[str, tuple[dict, str, str]] = {}  # code -> (claims, redirect_uri, code_challenge)
        self.tokens: dict[str, dict] = {}  # access token -> claims
        self.errors: list[str] = []  # protocol errors the hub made (must stay empty)
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, error: str, description: str) -> None:
                provider.errors.append(f"{self.path.split('?')[0]}: {description}")
                self._send(status, {"error": error, "error_description": description})

            def do_GET(self):
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/authorize":
                    if q.get("client_id") != CLIENT_ID or q.get("response_type") != "code":
                        return self._error(400, "invalid_request", f"bad client_id/response_type: {q}")
                    if q.get("redirect_uri") != provider.redirect_uri:
                        return self._error(400, "invalid_request", f"unregistered redirect_uri {q.get('redirect_uri')}")
                    if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
                        return self._error(400, "invalid_request", "PKCE (S256) expected")
                    with provider.lock:
                        if provider.claims is None:
                            return self._error(400, "access_denied", "no user picked")
                        code = secrets.token_urlsafe(16)
                        provider.codes[code] = (provider.claims, q["redirect_uri"], q["code_challenge"])
                    target = f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q.get('state', '')})}"
                    return self._send(302, {}, {"Location": target})
                if url.path == "/jwks":
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(provider.key.public_key()))
                    return self._send(200, {"keys": [{**jwk, "kid": provider.kid, "use": "sig", "alg": "RS256"}]})
                if url.path == "/.well-known/openid-configuration":
                    return self._send(
                        200,
                        {
                            "issuer": provider.issuer,
                            "authorization_endpoint": f"{provider.issuer}/authorize",
                            "token_endpoint": f"{provider.issuer}/token",
                            "userinfo_endpoint": f"{provider.issuer}/userinfo",
                            "jwks_uri": f"{provider.issuer}/jwks",
                            "id_token_signing_alg_values_supported": ["RS256"],
                        },
                    )
                if url.path == "/userinfo":
                    auth = self.headers.get("Authorization", "")
                    claims = (
                        provider.tokens.get(auth.removeprefix("Bearer ").strip())
                        if auth.startswith("Bearer ")
                        else None
                    )
                    if claims is None:
                        return self._error(401, "invalid_token", "unknown access token")
                    return self._send(200, claims)
                return self._send(404, {"error": "not_found"})

            def do_POST(self):
                if urlsplit(self.path).path != "/token":
                    return self._send(404, {"error": "not_found"})
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                    return self._error(401, "invalid_client", "wrong client credentials")
                if form.get("grant_type") != "authorization_code":
                    return self._error(400, "unsupported_grant_type", form.get("grant_type", ""))
                with provider.lock:
                    entry = provider.codes.pop(form.get("code", ""), None)
                if entry is None:
                    return self._error(400, "invalid_grant", "unknown or reused code")
                claims, redirect_uri, challenge = entry
                if form.get("redirect_uri") != redirect_uri:
                    return self._error(400, "invalid_grant", "redirect_uri differs from the authorize request")
                verifier = form.get("code_verifier", "").encode()
                expected = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
                if expected != challenge:
                    return self._error(400, "invalid_grant", "PKCE verification failed")
                token = secrets.token_urlsafe(24)
                provider.tokens[token] = claims
                sub = str(claims.get("sub", claims.get("preferred_username", "anonymous")))
                now = int(time.time())
                forge = dict(provider.forge)
                id_token = jwt.encode(
                    {
                        "iss": forge.get("iss", provider.issuer),
                        "aud": forge.get("aud", CLIENT_ID),
                        "sub": sub,
                        "iat": now,
                        "exp": now + 600,
                    },
                    forge.get("key", provider.key),
                    algorithm="RS256",
                    headers={"kid": provider.kid},
                )
                return self._send(
                    200,
                    {
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": 600,
                        "id_token": id_token,
                        "scope": "openid profile email groups",
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Provider:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def state_dir() -> Path:
    parent = Path(tempfile.mkdtemp(prefix="wb-oidc-", dir="/tmp"))
    parent.chmod(0o711)
    return parent / "state"


def platform_yaml(provider: Provider, folder: Path) -> Path:
    """demo.yaml's groups and profiles, with auth switched to generic-oauth at the provider."""
    data = yaml.safe_load(DEMO.read_text())
    data["name"] = "Workbench OIDC test"
    data["auth"] = {
        "type": "generic-oauth",
        "client_id": CLIENT_ID,
        "client_secret_env": SECRET_ENV,
        "authorize_url": f"{provider.issuer}/authorize",
        "token_url": f"{provider.issuer}/token",
        "userdata_url": f"{provider.issuer}/userinfo",
        "jwks_url": f"{provider.issuer}/jwks",
        "issuer": provider.issuer,
        "scope": ["openid", "profile", "groups"],
        "login_service": "Test University SSO",
        "username_claim": "preferred_username",
        "groups_claim": "groups",
        "admin_groups": ["platform-admins"],
    }
    path = folder / "platform-oidc.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def provider():
    with Provider() as p:
        yield p


@pytest.fixture(scope="module")
def wb(provider):
    state = state_dir()
    w = Workbench(state, config=platform_yaml(provider, state.parent), env={SECRET_ENV: CLIENT_SECRET})
    provider.redirect_uri = f"{w.url}/hub/oauth_callback"
    w.start()
    yield w
    code = w.stop()
    assert code == 0, w.output()
    assert not w.leftovers(), w.leftovers()
    assert provider.errors == [], provider.errors


def oidc_login(wb: Workbench, provider: Provider, claims: dict) -> tuple[requests.Session, requests.Response]:
    """Log in through the hub and the provider like a browser; returns the session and the last response."""
    provider.claims = claims
    s = requests.Session()
    r = s.get(f"{wb.url}/hub/oauth_login", params={"next": "/hub/home"}, timeout=30)
    provider.claims = None
    hops = [h.url.split("?")[0] for h in r.history] + [r.url.split("?")[0]]
    assert hops[:3] == [f"{wb.url}/hub/oauth_login", f"{provider.issuer}/authorize", f"{wb.url}/hub/oauth_callback"], (
        hops
    )
    return s, r


def own_token(wb: Workbench, session: requests.Session, name: str) -> str:
    return wb.new_token(session, name)


@pytest.fixture(scope="module")
def admin_token(wb, provider):
    s, r = oidc_login(wb, provider, {"sub": "1", "preferred_username": "oidc-admin", "groups": ["platform-admins"]})
    assert r.status_code == 200, r.text
    return own_token(wb, s, "oidc-admin")


def test_login_page_offers_the_sso_button(wb):
    r = requests.get(f"{wb.url}/hub/login", timeout=30)
    assert r.status_code == 200
    assert "Sign in with Test University SSO" in r.text
    assert "Workbench OIDC test: sign in with Test University SSO" in r.text


def test_entitled_user_logs_in_with_exactly_the_policy_groups(wb, provider):
    s, r = oidc_login(
        wb,
        provider,
        {"sub": "2", "preferred_username": "alice", "groups": ["maths-staff", "physics-lab", "course-ml101"]},
    )
    assert r.status_code == 200 and r.url == f"{wb.url}/hub/home", (r.status_code, r.url)
    assert "alice" in r.text
    token = own_token(wb, s, "alice")
    model = wb.token_api(token, "GET", "/users/alice").json()
    assert sorted(model["groups"]) == ["course-ml101", "physics-lab"]  # maths-staff is no policy group
    assert model["admin"] is False


def test_admin_group_member_is_admin(wb, provider, admin_token):
    model = wb.token_api(admin_token, "GET", "/users/oidc-admin").json()
    assert model["admin"] is True
    assert model["groups"] == ["platform-admins"]
    # an admin sees the others' groups too
    s, r = oidc_login(wb, provider, {"sub": "3", "preferred_username": "carol", "groups": ["startup-acme"]})
    assert r.status_code == 200
    carol = wb.token_api(admin_token, "GET", "/users/carol").json()
    assert carol["groups"] == ["startup-acme"] and carol["admin"] is False


def test_groups_follow_the_claims_at_every_login(wb, provider, admin_token):
    for groups, expected, admin in (
        (["physics-lab"], ["physics-lab"], False),
        (["course-ml101", "platform-admins"], ["course-ml101", "platform-admins"], True),
        (["course-ml101"], ["course-ml101"], False),  # admin is revoked with the group
    ):
        _, r = oidc_login(wb, provider, {"sub": "4", "preferred_username": "dave", "groups": groups})
        assert r.status_code == 200, r.text
        model = wb.token_api(admin_token, "GET", "/users/dave").json()
        assert sorted(model["groups"]) == expected and model["admin"] is admin, model


MALFORMED = "your identity provider sent a malformed 'groups' claim (expected a list of group names, got "


@pytest.mark.parametrize(
    "claims, detail",
    [
        ({}, "your identity provider sent no 'groups' claim"),
        ({"groups": []}, "your identity provider sent groups: none (an empty list)"),
        ({"groups": ["maths-staff", "library"]}, 'your identity provider sent groups: "maths-staff", "library"'),
        ({"groups": "physics-lab"}, MALFORMED + 'a string: "physics-lab")'),
        ({"groups": ["physics-lab", 7]}, MALFORMED + "a list containing 7 (a number))"),
        ({"groups": {"physics-lab": True}}, MALFORMED + 'an object: {"physics-lab": true})'),
        ({"groups": [["physics-lab"]]}, MALFORMED + 'a list containing ["physics-lab"] (a list))'),
        ({"groups": None}, MALFORMED + "null)"),
    ],
    ids=["missing", "empty", "unknown-only", "string", "mixed-list", "object", "nested-list", "null"],
)
def test_no_policy_group_gives_a_clear_403(wb, provider, admin_token, claims, detail):
    name = "refused-" + secrets.token_hex(3)
    _, r = oidc_login(wb, provider, {"sub": name, "preferred_username": name, **claims})
    assert r.status_code == 403, (r.status_code, r.text[-2000:])
    text = html.unescape(r.text)
    assert f"{NOT_ENTITLED}; {detail}." in text, text[-2000:]
    assert "ask the platform team" in text
    # nobody was created in the hub
    assert wb.token_api(admin_token, "GET", f"/users/{name}").status_code == 404


def test_missing_user_name_gives_a_clear_403(wb, provider):
    _, r = oidc_login(wb, provider, {"sub": "5", "groups": ["physics-lab"]})
    assert r.status_code == 403, (r.status_code, r.text[-2000:])
    assert "did not send your user name (no usable 'preferred_username' claim)" in html.unescape(r.text)


@pytest.mark.parametrize(
    "forge, reason",
    [
        ({"key": "another"}, "Signature verification failed"),
        ({"iss": "http://127.0.0.1:1/not-the-provider"}, "Invalid issuer"),
        ({"aud": "another-client"}, "Audience doesn't match"),
    ],
    ids=["signed-by-another-key", "wrong-issuer", "wrong-audience"],
)
def test_an_id_token_not_signed_by_the_provider_for_this_hub_is_refused(wb, provider, admin_token, forge, reason):
    """The user info would entitle the user; the ID token alone is wrong, and the login is refused (403)."""
    if forge.get("key") == "another":
        forge = {"key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    name = "forged-" + secrets.token_hex(3)
    provider.forge = forge
    try:
        _, r = oidc_login(wb, provider, {"sub": name, "preferred_username": name, "groups": ["physics-lab"]})
    finally:
        provider.forge = {}
    assert r.status_code == 403, (r.status_code, r.text[-2000:])
    text = html.unescape(r.text)
    assert "Login refused: the identity provider's ID token is not valid" in text and reason in text, text[-2000:]
    assert wb.token_api(admin_token, "GET", f"/users/{name}").status_code == 404  # nobody was created
    # and the same user, with a genuine token, gets in
    _, r = oidc_login(wb, provider, {"sub": name, "preferred_username": name, "groups": ["physics-lab"]})
    assert r.status_code == 200 and r.url == f"{wb.url}/hub/home", (r.status_code, r.url)


def test_refused_logins_never_reached_a_500(wb):
    log = wb.hub_log()
    assert " 500 " not in log and "Traceback" not in log, log[-4000:]
    # the one-time authorization code never reaches the log (JupyterHub's access log masks it as [secret])
    assert "/hub/oauth_callback?code=[secret]" in log
    assert not re.search(r"oauth_callback\?code=(?!\[secret\])", log), log[-4000:]
    assert CLIENT_SECRET not in log and CLIENT_SECRET not in wb.output()


def test_missing_client_secret_stops_the_start_with_a_clear_message(provider):
    state = state_dir()
    w = Workbench(state, config=platform_yaml(provider, state.parent))  # no SECRET_ENV
    with pytest.raises(RuntimeError) as info:
        w.start(timeout=90)
    out = str(info.value)
    assert "auth.client_secret_env" in out
    assert f"the environment variable {SECRET_ENV} is not set (or empty)" in out
    assert w.leftovers() == []
