"""Who is calling: bearer tokens (JWT) to user ids.

Tokens come from, in this order: the ``Authorization: Bearer`` header; the
``Sec-WebSocket-Protocol`` header, as ``bearer.<jwt>`` offered beside the
protocol name ``durable-chat.v1`` (browsers cannot set headers on a
WebSocket, and query strings end up in logs); the ``token`` query parameter.
With auth off every caller is ``anonymous``.

Keys: an HMAC secret (HS256/384/512), or public keys (RS*, PS*, ES*, EdDSA)
from a PEM or a JWKS file; never both kinds at once. A verifier that accepts
HS256 and RS256 with one key can be fooled into checking an HMAC computed
with the public key as secret (key confusion), so the kinds cannot be mixed,
and ``none`` is never accepted. ``exp`` and ``sub`` are required; ``nbf``,
``iat``, ``iss`` and ``aud`` are checked, with CHAT_AUTH_LEEWAY_S of clock
skew. Keys are loaded (and a bad configuration refused) when the pod starts.
No message here ever contains the token.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.requests import HTTPConnection

from app.chat import keys
from app.chat.keys import UserId
from app.settings import ConfigError, Settings

log = logging.getLogger(__name__)

ANONYMOUS = UserId("anonymous")
# The WebSocket subprotocol of protocol v1, and the prefix that carries a
# token beside it in Sec-WebSocket-Protocol. The server answers with the
# protocol name only: a token is never echoed.
SUBPROTOCOL = "durable-chat.v1"
BEARER_SUBPROTOCOL = "bearer."
# Longer tokens are refused before any parsing (a cheap bound on the work a
# stranger can make us do).
MAX_TOKEN_CHARS = 8192
# RFC 7518 3.2: an HS256 key must be at least as long as the hash (256 bits).
MIN_SECRET_BYTES = 32

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Public-key algorithms and the key type each verifies with.
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    **{alg: (rsa.RSAPublicKey,) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    **{alg: (ec.EllipticCurvePublicKey,) for alg in ("ES256", "ES384", "ES512")},
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
PUBLIC_KEY_ALGORITHMS = frozenset(_KEY_TYPES)
DEFAULT_PUBLIC_ALGORITHMS = ("RS256", "ES256")


class AuthError(Exception):
    """The caller could not be authenticated; the message says why (never the token)."""


class Authenticator:
    """Verifies bearer tokens with the configured keys; built once per pod."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._leeway = settings.chat_auth_leeway_s
        self._issuer = settings.chat_auth_issuer or None
        audiences = _csv(settings.chat_auth_audience)
        self._audience: list[str] | None = audiences or None
        self._require = ["sub", "exp"]
        self._secret: bytes | None = None
        self._public_key: Any = None
        self._jwks: JwksFile | None = None
        self.algorithms: list[str] = []
        if not self.enabled:
            return
        self.algorithms = configured_algorithms(settings)
        if self.algorithms[0] in HMAC_ALGORITHMS:
            self._secret = _load_secret(settings)
        elif settings.chat_auth_jwks_file:
            self._jwks = JwksFile(Path(settings.chat_auth_jwks_file))
        else:
            self._public_key = _load_public_key(settings)
            usable = [a for a in self.algorithms if _fits(a, self._public_key)]
            if not usable:
                raise ConfigError(
                    f"the public key is a {type(self._public_key).__name__} but "
                    f"CHAT_AUTH_ALGORITHMS allows only {','.join(self.algorithms)}"
                )
            self.algorithms = usable

    def user_for(self, conn: HTTPConnection) -> UserId:
        """The caller's user id, or AuthError."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(conn)
        if not token:
            raise AuthError("a bearer token is required")
        return self.verify(token)

    def verify(self, token: str) -> UserId:
        """The user id (``sub``) of a valid token, or AuthError saying why not."""
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token too long")
        try:
            key, algorithms = self._key_for(token)
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self._audience,
                issuer=self._issuer, leeway=self._leeway, options={"require": self._require},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        try:
            return keys.user_id(claims["sub"])
        except keys.InvalidId as exc:
            raise AuthError(f"token subject: {exc}") from None

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        """The key to check ``token`` with, and the algorithms it may use."""
        if self._secret is not None:
            return self._secret, self.algorithms
        if self._jwks is None:
            return self._public_key, self.algorithms
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise jwt.InvalidAlgorithmError("algorithm not allowed")
        kid = header.get("kid")
        jwk = self._jwks.find(kid if isinstance(kid, str) else None)
        if jwk is None:
            raise jwt.InvalidKeyError("no key with that kid")
        declared = jwk._jwk_data.get("alg")
        if (declared is not None and declared != alg) or not _fits(alg, jwk.key):
            raise jwt.InvalidAlgorithmError("the key does not sign with that algorithm")
        return jwk.key, [alg]


class JwksFile:
    """Public keys from a JWKS file (an identity provider's key set, mounted).

    A token names its key by ``kid``; a set of one key also serves tokens
    without a ``kid``. The file is read again when a token names an unknown
    ``kid`` and the file changed since, so a key rotation needs no restart.
    Symmetric (``oct``) keys are ignored: this verifier is public-key only.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime = -1.0
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._reload()
        if not self._keys:
            raise ConfigError(f"CHAT_AUTH_JWKS_FILE {path} holds no usable public key")

    def find(self, kid: str | None) -> jwt.PyJWK | None:
        found = self._keys.get(kid)
        if found is None and kid is not None and self._changed():
            self._reload()
            found = self._keys.get(kid)
        return found

    def _changed(self) -> bool:
        try:
            return os.stat(self._path).st_mtime != self._mtime
        except OSError:
            return False

    def _reload(self) -> None:
        try:
            mtime = os.stat(self._path).st_mtime
            text = self._path.read_text()
            key_set = jwt.PyJWKSet.from_json(text)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            if self._mtime < 0:
                raise ConfigError(f"cannot read CHAT_AUTH_JWKS_FILE {self._path}: {exc}") from None
            log.warning("keeping the old JWKS: cannot read %s: %s", self._path, exc)
            return
        found: dict[str | None, jwt.PyJWK] = {}
        for jwk in key_set.keys:
            if jwk.key_type == "oct":
                continue
            found[jwk.key_id] = jwk
        if len(found) == 1:
            found.setdefault(None, next(iter(found.values())))
        self._keys, self._mtime = found, mtime
        log.info("loaded %d public key(s) from %s", len(key_set.keys), self._path)


def development_token(settings: Settings, user: str, ttl_s: int) -> str:
    """A token for ``user`` signed with the configured HMAC secret, for trying
    authentication locally (``durable-chat token``). Real deployments get
    their tokens from their own backend or identity provider. ConfigError
    without a secret, or when the pods accept public-key tokens only."""
    if not (settings.chat_auth_secret or settings.chat_auth_secret_file):
        raise ConfigError(
            "no CHAT_AUTH_SECRET (or CHAT_AUTH_SECRET_FILE): set the secret your pods use"
        )
    algorithm = configured_algorithms(settings)[0]
    if algorithm not in HMAC_ALGORITHMS:
        raise ConfigError(
            f"the pods accept {algorithm} tokens: mint them with your identity provider"
        )
    now = int(time.time())
    claims: dict[str, Any] = {"sub": keys.user_id(user), "iat": now, "exp": now + ttl_s}
    if settings.chat_auth_issuer:
        claims["iss"] = settings.chat_auth_issuer
    if audiences := _csv(settings.chat_auth_audience):
        claims["aud"] = audiences[0]
    return jwt.encode(claims, _load_secret(settings), algorithm=algorithm)


def configured_algorithms(settings: Settings) -> list[str]:
    """CHAT_AUTH_ALGORITHMS (or its default), checked: never ``none``, never
    HMAC and public-key algorithms together, and a key for the kind chosen."""
    has_secret = bool(settings.chat_auth_secret or settings.chat_auth_secret_file)
    has_public = bool(
        settings.chat_auth_public_key
        or settings.chat_auth_public_key_file
        or settings.chat_auth_jwks_file
    )
    names = _csv(settings.chat_auth_algorithms)
    if not names:
        if has_secret and has_public:
            raise ConfigError(
                "both a secret and public keys are configured: set CHAT_AUTH_ALGORITHMS "
                "to say which kind of token to accept"
            )
        return list(DEFAULT_PUBLIC_ALGORITHMS if has_public else ["HS256"])
    for name in names:
        if name.lower() == "none":
            raise ConfigError("CHAT_AUTH_ALGORITHMS: 'none' is never accepted; tokens are signed")
        if name not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            known = ", ".join(sorted(HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS))
            raise ConfigError(f"CHAT_AUTH_ALGORITHMS: unknown algorithm {name!r} (known: {known})")
    hmac = [name in HMAC_ALGORITHMS for name in names]
    if any(hmac) and not all(hmac):
        raise ConfigError(
            "CHAT_AUTH_ALGORITHMS mixes HMAC (HS*) and public-key algorithms: a public key "
            "would then verify forged HMAC tokens (key confusion). Choose one kind."
        )
    if all(hmac) and not has_secret:
        raise ConfigError("HS* algorithms need CHAT_AUTH_SECRET or CHAT_AUTH_SECRET_FILE")
    if not any(hmac) and not has_public:
        raise ConfigError(
            "public-key algorithms need CHAT_AUTH_PUBLIC_KEY, CHAT_AUTH_PUBLIC_KEY_FILE "
            "or CHAT_AUTH_JWKS_FILE"
        )
    return names


def _load_secret(settings: Settings) -> bytes:
    if settings.chat_auth_secret and settings.chat_auth_secret_file:
        raise ConfigError("set CHAT_AUTH_SECRET or CHAT_AUTH_SECRET_FILE, not both")
    if settings.chat_auth_secret:
        secret = settings.chat_auth_secret.encode()
    else:
        secret = _read(settings.chat_auth_secret_file or "", "CHAT_AUTH_SECRET_FILE").strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the auth secret is {len(secret)} bytes; HS256 needs at least {MIN_SECRET_BYTES} "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    return secret


def _load_public_key(settings: Settings) -> Any:
    if settings.chat_auth_public_key and settings.chat_auth_public_key_file:
        raise ConfigError("set CHAT_AUTH_PUBLIC_KEY or CHAT_AUTH_PUBLIC_KEY_FILE, not both")
    if settings.chat_auth_public_key:
        # An environment variable often carries a PEM with its newlines escaped.
        pem = settings.chat_auth_public_key.replace("\\n", "\n").encode()
    else:
        pem = _read(settings.chat_auth_public_key_file or "", "CHAT_AUTH_PUBLIC_KEY_FILE")
    try:
        return load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the auth public key is not a PEM public key: {exc}") from None


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {name} {path}: {exc.strerror}") from None


def _fits(algorithm: str, key: Any) -> bool:
    """Whether ``key`` is the kind of key ``algorithm`` verifies with."""
    return isinstance(key, _KEY_TYPES.get(algorithm, ()))


def _csv(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def offered_subprotocols(conn: HTTPConnection) -> list[str]:
    """What the client offered in Sec-WebSocket-Protocol, in order."""
    return _csv(conn.headers.get("sec-websocket-protocol"))


def chosen_subprotocol(conn: HTTPConnection) -> str | None:
    """The subprotocol to accept a socket with: ours when offered (a browser
    that offered subprotocols fails the socket unless one is chosen), never
    the ``bearer.`` entry."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(conn) else None


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token a request carries: header, then subprotocol, then query."""
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for offered in offered_subprotocols(conn):
        if offered.startswith(BEARER_SUBPROTOCOL):
            return offered[len(BEARER_SUBPROTOCOL) :]
    return conn.query_params.get("token")
