"""Bound ServiceAccount tokens as kube-apiserver mints and reviews them (for the test API server).

Facts carried over from Kubernetes (TokenRequest / TokenReview, authentication.k8s.io/v1):
- a token is an RS256 JWT with `iss`, `sub` = system:serviceaccount:<ns>:<sa>, `aud` (a list),
  `exp`, `iat`, `nbf`, `jti` and a private `kubernetes.io` claim naming the namespace, the
  service account {name, uid}, the bound pod {name, uid} and (when the pod is scheduled and the
  Node exists) the node {name, uid};
- a review's `spec.audiences` defaults to the API server's own audiences; the token must be for
  at least one of them, and `status.audiences` is the intersection;
- time claims are checked with go-jose's one-minute leeway;
- the bound objects must still exist with the same uid, else the token "has been invalidated";
- `status.user.extra` carries authentication.kubernetes.io/pod-name, pod-uid, node-name,
  node-uid and credential-id (JTI=<jti>), each a list of one string;
- errors read `[invalid bearer token, <cause>]` in `status.error`, `authenticated` false.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

Obj = dict[str, Any]

ISSUER = "https://kubernetes.default.svc.cluster.local"
LEEWAY = 60  # seconds: go-jose's jwt.DefaultLeeway, which the SA token validator uses

EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_NODE_UID = "authentication.kubernetes.io/node-uid"
EXTRA_CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"

# (resource, namespace, name) -> the stored object, or None
Lookup = Callable[[str, str, str], "Obj | None"]


class TokenRequestError(ValueError):
    """The TokenRequest the test asked for is one the real API server refuses."""


def username(namespace: str, service_account: str) -> str:
    return f"system:serviceaccount:{namespace}:{service_account}"


class TokenAuthority:
    """The API server's service-account signing key: mints and reviews bound tokens."""

    def __init__(self, issuer: str = ISSUER, api_audiences: Sequence[str] = (ISSUER,)) -> None:
        self.issuer = issuer
        self.api_audiences = tuple(api_audiences)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        # kube-apiserver's kid is the base64url SHA-256 of the public key's DER.
        self.kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwks(self) -> Obj:
        """The key set served at /openid/v1/jwks."""
        jwk: Obj = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return {"keys": [jwk]}

    def mint(self, lookup: Lookup, namespace: str, service_account: str,
             audiences: Sequence[str] | None = None, *, pod: str | None = None,
             expiration_seconds: int = 3600, now: float | None = None) -> str:
        """What `kubectl create token SA --audience A --bound-object-kind Pod` returns."""
        sa = lookup("serviceaccounts", namespace, service_account)
        if sa is None:
            raise TokenRequestError(f'serviceaccounts "{service_account}" not found')
        if expiration_seconds < 600:
            raise TokenRequestError("spec.expirationSeconds: may not specify a duration less "
                                    "than 10 minutes")
        issued = int(now if now is not None else time.time())
        k8s: Obj = {"namespace": namespace,
                    "serviceaccount": {"name": service_account, "uid": sa["metadata"]["uid"]}}
        if pod is not None:
            p = lookup("pods", namespace, pod)
            if p is None:
                raise TokenRequestError(f'pods "{pod}" not found')
            if p.get("spec", {}).get("serviceAccountName", "default") != service_account:
                raise TokenRequestError(f"cannot bind token for serviceaccount "
                                        f'"{service_account}" to pod running with different '
                                        "serviceaccount name.")
            k8s["pod"] = {"name": pod, "uid": p["metadata"]["uid"]}
            node_name = p.get("spec", {}).get("nodeName")
            node = lookup("nodes", "", node_name) if node_name else None
            if node is not None:  # the claim is added only when the Node can be read
                k8s["node"] = {"name": node_name, "uid": node["metadata"]["uid"]}
        claims: Obj = {
            "iss": self.issuer,
            "sub": username(namespace, service_account),
            "aud": list(audiences) if audiences else list(self.api_audiences),
            "exp": issued + expiration_seconds,
            "iat": issued,
            "nbf": issued,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": k8s,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def review(self, lookup: Lookup, token: str, audiences: Sequence[str] = ()) -> Obj:
        """The `status` of a TokenReview of this token for these audiences."""
        wanted = list(audiences) or list(self.api_audiences)
        try:
            claims = self._verify(token, wanted)
            user = self._user(lookup, claims)
        except _Invalid as e:
            return {"user": {}, "error": f"[invalid bearer token, {e}]"}
        token_aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        return {"authenticated": True, "user": user,
                "audiences": [a for a in wanted if a in token_aud]}

    def _verify(self, token: str, wanted: list[str]) -> Obj:
        try:
            header = jwt.get_unverified_header(token)
            unverified: Obj = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise _Invalid(f"token is not a JWT: {e}") from None
        if unverified.get("iss") != self.issuer:
            raise _Invalid("token issuer is not this cluster's service account issuer")
        if header.get("alg") != "RS256":
            raise _Invalid(f"unsupported signing algorithm {header.get('alg')!r}")
        token_aud = unverified.get("aud")
        token_aud = token_aud if isinstance(token_aud, list) else [token_aud]
        if not set(token_aud) & set(wanted):
            raise _Invalid(f"token audiences {_go_list(token_aud)} is invalid for the target "
                           f"audiences {_go_list(wanted)}")
        try:
            claims: Obj = jwt.decode(token, self._key.public_key(), algorithms=["RS256"],
                                     leeway=LEEWAY, options={"verify_aud": False,
                                                             "require": ["exp", "iat", "sub"]})
        except jwt.ExpiredSignatureError:
            raise _Invalid("service account token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _Invalid("service account token is not valid yet") from None
        except jwt.InvalidSignatureError:
            raise _Invalid("go-jose/go-jose: error in cryptographic primitive") from None
        except jwt.PyJWTError as e:
            raise _Invalid(str(e)) from None
        return claims

    @staticmethod
    def _user(lookup: Lookup, claims: Obj) -> Obj:
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict):
            raise _Invalid("token has no kubernetes.io claim")
        ns = k8s.get("namespace", "")
        sa_ref = k8s.get("serviceaccount") or {}
        sa = lookup("serviceaccounts", ns, sa_ref.get("name", ""))
        if sa is None or sa["metadata"]["uid"] != sa_ref.get("uid"):
            raise _Invalid("service account token has been invalidated")
        extra: dict[str, list[str]] = {EXTRA_CREDENTIAL_ID: [f"JTI={claims.get('jti', '')}"]}
        pod_ref = k8s.get("pod")
        if pod_ref:
            pod = lookup("pods", ns, pod_ref.get("name", ""))
            if pod is None or pod["metadata"]["uid"] != pod_ref.get("uid"):
                raise _Invalid("service account token has been invalidated")
            extra[EXTRA_POD_NAME] = [pod_ref["name"]]
            extra[EXTRA_POD_UID] = [pod_ref["uid"]]
        node_ref = k8s.get("node")
        if node_ref:
            node = lookup("nodes", "", node_ref.get("name", ""))
            if node is None or node["metadata"]["uid"] != node_ref.get("uid"):
                raise _Invalid("service account token has been invalidated")
            extra[EXTRA_NODE_NAME] = [node_ref["name"]]
            extra[EXTRA_NODE_UID] = [node_ref["uid"]]
        return {
            "username": username(ns, sa_ref["name"]),
            "uid": sa_ref["uid"],
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}",
                       "system:authenticated"],
            "extra": extra,
        }


class _Invalid(Exception):  # noqa: N818  # a token the authenticator refuses
    pass


def _go_list(items: Sequence[Any]) -> str:
    """A Go `%q` of a []string: ["a" "b"]."""
    return "[" + " ".join(f'"{i}"' for i in items) + "]"
