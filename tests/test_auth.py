"""Token verification (app.auth): algorithms, claims, key sources, and the
configurations a pod must refuse to start with."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.requests import HTTPConnection

from app.auth import (
    MAX_TOKEN_CHARS,
    SUBPROTOCOL,
    Authenticator,
    AuthError,
    bearer_token,
    chosen_subprotocol,
    development_token,
)
from app.chat import keys
from app.settings import ConfigError, Settings

SECRET = "s" * 64
ISSUER = "https://id.example.com/"
AUDIENCE = "durable-chat"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"sub": "alice", "exp": now + 300, "iat": now}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def hs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def auth(make_settings: Callable[..., Settings]) -> Callable[..., Authenticator]:
    def make(**overrides: Any) -> Authenticator:
        return Authenticator(make_settings(chat_auth="jwt", **overrides))

    return make


# --- HS256 ---------------------------------------------------------------------


def test_a_valid_hs256_token_names_its_user(auth: Callable[..., Authenticator]) -> None:
    assert auth(chat_auth_secret=SECRET).verify(hs256()) == "alice"


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (lambda: hs256(exp=int(time.time()) - 120), "token expired"),
        (lambda: hs256(nbf=int(time.time()) + 600), "token not yet valid"),
        (lambda: jwt.encode(claims(), "x" * 64, algorithm="HS256"), "invalid token"),
        (lambda: hs256(exp=None), "token lacks the exp claim"),
        (lambda: hs256(sub=None), "token lacks the sub claim"),
        (lambda: hs256(sub="a{b}"), "token subject"),
        (lambda: hs256(aud="someone-else"), "token audience not accepted"),
        (lambda: jwt.encode(claims(), SECRET, algorithm="HS512"), "token algorithm not accepted"),
        (lambda: "not.a.token", "invalid token"),
        (lambda: "", "a bearer token is required"),
    ],
    ids=[
        "expired", "not-yet-valid", "wrong-secret", "no-exp", "no-sub", "bad-sub",
        "unexpected-audience", "wrong-algorithm", "garbage", "missing",
    ],
)  # fmt: skip
def test_bad_hs256_tokens_are_refused_with_a_reason(
    auth: Callable[..., Authenticator], token: Callable[[], str], why: str
) -> None:
    verifier = auth(chat_auth_secret=SECRET)
    with pytest.raises(AuthError, match=why) as refused:
        verifier.user_for(_conn(headers={"authorization": f"Bearer {token()}"}))
    raw = token()
    assert not raw or raw not in str(refused.value)  # never the token itself


def test_alg_none_is_refused(auth: Callable[..., Authenticator]) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(AuthError, match="algorithm not accepted"):
        auth(chat_auth_secret=SECRET).verify(unsigned)
    # And hand-made, with a signature part that is empty or not.
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(json.dumps(claims()).encode()).decode()
    for forged in (f"{header}.{body}.", f"{header}.{body}.c2ln"):
        with pytest.raises(AuthError):
            auth(chat_auth_secret=SECRET).verify(forged)


def test_clock_skew_within_the_leeway_is_tolerated(auth: Callable[..., Authenticator]) -> None:
    verifier = auth(chat_auth_secret=SECRET, chat_auth_leeway_s=30)
    assert verifier.verify(hs256(exp=int(time.time()) - 10)) == "alice"
    assert verifier.verify(hs256(nbf=int(time.time()) + 10)) == "alice"
    with pytest.raises(AuthError, match="expired"):
        auth(chat_auth_secret=SECRET, chat_auth_leeway_s=0).verify(hs256(exp=int(time.time()) - 10))


def test_issuer_and_audience_are_checked_when_configured(
    auth: Callable[..., Authenticator],
) -> None:
    verifier = auth(
        chat_auth_secret=SECRET, chat_auth_issuer=ISSUER, chat_auth_audience=f"x,{AUDIENCE}"
    )
    assert verifier.verify(hs256(iss=ISSUER, aud=AUDIENCE)) == "alice"
    with pytest.raises(AuthError, match="audience not accepted"):
        verifier.verify(hs256(iss=ISSUER, aud="another-app"))
    with pytest.raises(AuthError, match="lacks the aud"):
        verifier.verify(hs256(iss=ISSUER))
    with pytest.raises(AuthError, match="issuer not accepted"):
        verifier.verify(hs256(iss="https://evil.example.com/", aud=AUDIENCE))
    with pytest.raises(AuthError, match="lacks the iss"):
        verifier.verify(hs256(aud=AUDIENCE))


def test_oversized_tokens_are_refused_unparsed(auth: Callable[..., Authenticator]) -> None:
    with pytest.raises(AuthError, match="too long"):
        auth(chat_auth_secret=SECRET).verify("a" * (MAX_TOKEN_CHARS + 1))


def test_secret_from_a_file(auth: Callable[..., Authenticator], tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert auth(chat_auth_secret_file=str(path)).verify(hs256()) == "alice"


def test_auth_off_serves_everyone_as_anonymous(make_settings: Callable[..., Settings]) -> None:
    verifier = Authenticator(make_settings(chat_auth="off", chat_auth_secret=SECRET))
    assert verifier.user_for(_conn()) == "anonymous"


# --- public keys -----------------------------------------------------------------


def test_rs256_and_es256_with_public_keys(
    auth: Callable[..., Authenticator], rsa_key: Any, ec_key: Any, tmp_path: Path
) -> None:
    by_env = auth(chat_auth_public_key=pem(rsa_key.public_key()))
    assert by_env.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")) == "alice"
    path = tmp_path / "ec.pem"
    path.write_text(pem(ec_key.public_key()))
    by_file = auth(chat_auth_public_key_file=str(path))
    assert by_file.algorithms == ["ES256"]  # of the defaults, what an EC key verifies
    assert by_file.verify(jwt.encode(claims(), ec_key, algorithm="ES256")) == "alice"
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AuthError, match="invalid token"):
        by_file.verify(jwt.encode(claims(), other, algorithm="ES256"))


def test_pem_with_escaped_newlines_from_an_env_var(
    auth: Callable[..., Authenticator], rsa_key: Any
) -> None:
    escaped = pem(rsa_key.public_key()).replace("\n", "\\n")
    verifier = auth(chat_auth_public_key=escaped)
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")) == "alice"


def test_key_confusion_hs256_signed_with_the_public_key_is_refused(
    auth: Callable[..., Authenticator], rsa_key: Any
) -> None:
    public_pem = pem(rsa_key.public_key())
    verifier = auth(chat_auth_public_key=public_pem, chat_auth_algorithms="RS256")
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    signing_input = header + b"." + body
    signature = hmac.new(public_pem.encode(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    with pytest.raises(AuthError, match="algorithm not accepted"):
        verifier.verify(forged)


def test_jwks_file_picks_the_key_by_kid_and_follows_rotation(
    auth: Callable[..., Authenticator], rsa_key: Any, ec_key: Any, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    _write_jwks(path, {"rsa1": rsa_key.public_key()}, extra=[{"kty": "oct", "k": "c2VjcmV0"}])
    verifier = auth(chat_auth_jwks_file=str(path))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
    assert verifier.verify(token) == "alice"
    # A set of one key also serves tokens without a kid.
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")) == "alice"
    rotated = jwt.encode(claims(sub="bob"), ec_key, algorithm="ES256", headers={"kid": "ec2"})
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(rotated)  # unknown kid
    _write_jwks(path, {"rsa1": rsa_key.public_key(), "ec2": ec_key.public_key()})
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime, even on coarse clocks
    assert verifier.verify(rotated) == "bob"
    # A token naming one key but signed for another algorithm: refused.
    wrong = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa1"})
    with pytest.raises(AuthError, match="algorithm not accepted"):
        verifier.verify(wrong)
    # The oct key never verifies anything: HS256 is not a public-key algorithm.
    hs = jwt.encode(claims(), "k" * 32, algorithm="HS256")
    with pytest.raises(AuthError, match="algorithm not accepted"):
        verifier.verify(hs)


# --- configurations refused at start ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chat_auth_secret": SECRET, "chat_auth_algorithms": "none"}, "'none' is never"),
        ({"chat_auth_secret": SECRET, "chat_auth_algorithms": "HS256,NONE"}, "'none' is never"),
        ({"chat_auth_secret": SECRET, "chat_auth_algorithms": "HS256,RS256"}, "key confusion"),
        ({"chat_auth_secret": SECRET, "chat_auth_algorithms": "XS1"}, "unknown algorithm"),
        ({"chat_auth_secret": "short"}, "at least 32"),
        ({"chat_auth_secret": SECRET, "chat_auth_algorithms": "RS256"}, "public-key algorithms"),
        ({"chat_auth_public_key": "not a pem"}, "not a PEM public key"),
        ({"chat_auth_secret_file": "/nonexistent/secret"}, "cannot read"),
        ({"chat_auth_jwks_file": "/nonexistent/jwks"}, "cannot read"),
    ],
)
def test_unsafe_or_broken_auth_configs_refuse_to_start(
    auth: Callable[..., Authenticator], overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        auth(**overrides)


def test_secret_and_public_key_together_need_an_explicit_choice(
    auth: Callable[..., Authenticator], rsa_key: Any
) -> None:
    public = pem(rsa_key.public_key())
    with pytest.raises(ConfigError, match="CHAT_AUTH_ALGORITHMS"):
        auth(chat_auth_secret=SECRET, chat_auth_public_key=public)
    chosen = auth(
        chat_auth_secret=SECRET, chat_auth_public_key=public, chat_auth_algorithms="RS256"
    )
    assert chosen.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")) == "alice"


def test_key_of_the_wrong_type_for_the_algorithms(
    auth: Callable[..., Authenticator], ec_key: Any
) -> None:
    with pytest.raises(ConfigError, match="allows only RS256"):
        auth(chat_auth_public_key=pem(ec_key.public_key()), chat_auth_algorithms="RS256")


def test_jwks_without_public_keys_is_refused(
    auth: Callable[..., Authenticator], tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigError):
        auth(chat_auth_jwks_file=str(path))


def test_real_redis_without_any_key_refuses_to_start(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(chat_auth="jwt", redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="CHAT_AUTH_SECRET"):
        settings.check_startable()
    make_settings(chat_auth="off", redis_url="redis://127.0.0.1:1/0").check_startable()


def test_secrets_never_show_in_the_settings_repr(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(chat_auth_secret=SECRET, chat_auth_public_key="PEM-BODY")
    assert SECRET not in repr(settings) and "PEM-BODY" not in repr(settings)


# --- where tokens come from -------------------------------------------------------


def test_token_sources_in_order() -> None:
    both = {"authorization": "Bearer from-header", "sec-websocket-protocol": "x, bearer.from-sp"}
    assert bearer_token(_conn(both, query="token=from-query")) == "from-header"
    subprotocol = {"sec-websocket-protocol": f"{SUBPROTOCOL}, bearer.a.b.c"}
    assert bearer_token(_conn(subprotocol, query="token=q")) == "a.b.c"
    assert bearer_token(_conn(query="token=from-query")) == "from-query"
    assert bearer_token(_conn({"authorization": "Basic abc"})) is None


def test_the_chosen_subprotocol_is_ours_never_the_token() -> None:
    offered = {"sec-websocket-protocol": f"bearer.a.b.c, {SUBPROTOCOL}"}
    assert chosen_subprotocol(_conn(offered)) == SUBPROTOCOL
    assert chosen_subprotocol(_conn({"sec-websocket-protocol": "bearer.a.b.c"})) is None
    assert chosen_subprotocol(_conn()) is None


def _conn(headers: dict[str, str] | None = None, query: str = "") -> HTTPConnection:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "headers": raw, "query_string": query.encode(), "path": "/"}
    return HTTPConnection(scope)


def _write_jwks(
    path: Path, public: dict[str, Any], extra: list[dict[str, Any]] | None = None
) -> None:
    keys = []
    for kid, key in public.items():
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) else None
        if algorithm is not None:
            jwk = json.loads(algorithm.to_jwk(key))
        else:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
        jwk["kid"] = kid
        keys.append(jwk)
    path.write_text(json.dumps({"keys": [*keys, *(extra or [])]}))


def test_a_development_token_passes_the_pods_checks() -> None:
    settings = Settings(
        chat_auth="jwt", chat_auth_secret="d" * 40, chat_auth_issuer="https://dev.example/",
        chat_auth_audience="durable-chat,other",
    )  # fmt: skip
    token = development_token(settings, "alice", 60)
    assert Authenticator(settings).verify(token) == "alice"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60


def test_no_development_token_without_a_secret() -> None:
    with pytest.raises(ConfigError, match="CHAT_AUTH_SECRET"):
        development_token(Settings(chat_auth="jwt"), "alice", 60)
    with pytest.raises(keys.InvalidId):
        development_token(Settings(chat_auth_secret="d" * 40), "no{good}", 60)
