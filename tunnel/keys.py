"""Identities, pinned fingerprints and mutual authentication for the tunnel.

Who calls it: `vhostvpn keygen` / `vhostvpn fingerprint` (cli/keys.py), the hub (server contexts,
the peers file, `verify_client_auth`) and the endpoint (client contexts, `check_server`,
`sign_client_auth`); wire.py carries the bytes.  Rules: no sockets, no Trio, no home-made
crypto (only `cryptography` signatures and the x509 builder, and stdlib `ssl`); the only files
touched are an identity directory and a peers file; a private key is never written where
another user could read it, not even for an instant.

Theory of operation (docs/keys.md has the reasoning and the threat model):

1. Every node has an identity: a P-256 key (`key.pem`, mode 0600) and a self-signed
   certificate for it (`cert.pem`) that carries nothing but the public key.  A node is named
   by the fingerprint of that public key: "SHA256:" + unpadded base64 of
   sha256(SubjectPublicKeyInfo DER), the way `ssh-keygen -l` shows keys.
2. TLS 1.3 only.  The hub presents its certificate and asks for none.  The endpoint does not
   verify a chain (there is none); after the handshake it compares the fingerprint of the
   certificate the hub proved it holds the key for (TLS 1.3 CertificateVerify) with the
   pinned `--hub-fingerprint` (`check_server`), and hangs up on a mismatch before it sends
   a byte of its own.
3. The endpoint authenticates inside that channel, as SSH user auth does: the hub's HELLO
   carries a fresh 32-byte challenge; the endpoint answers with its certificate and a
   signature over `client_auth_transcript` = domain tag, challenge, hub fingerprint (as the
   endpoint saw it in the handshake), endpoint fingerprint, claimed name.  The hub looks the
   key up in its peers file (`Peers`) before it spends a signature verification on it.
4. Trust lives in the pinned fingerprints only: the hub ignores everything in the
   endpoint's certificate but its public key (names, dates, self-signature), and the
   endpoint ignores everything in the hub's certificate but its public key.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import os
import re
import secrets
import ssl
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"

# "SHA256:" + base64(sha256(SPKI)) without padding: 43 characters after the prefix.
FINGERPRINT_PREFIX = "SHA256:"
FINGERPRINT_BYTES = 32
# The hub's challenge in HELLO.
CHALLENGE_BYTES = 32
# Domain separation: no TLS 1.3 CertificateVerify input (64 spaces, "TLS 1.3, ...") and no
# other message signed with these keys starts like this, so one key may serve as both hub
# and endpoint identity.
CLIENT_AUTH_DOMAIN = b"vhostvpn client auth v1\0"
# Peer names: what the peers file may hold and an endpoint may claim (log- and shell-safe).
MAX_NAME_BYTES = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}", re.ASCII)
# Bounds on what an unauthenticated endpoint may make the hub parse.  Our certificates are
# ~290 bytes, P-256 signatures at most 72 (DER), Ed25519 signatures 64.
MAX_CERTIFICATE_BYTES = 4096
MAX_SIGNATURE_BYTES = 256
CERT_VALIDITY = datetime.timedelta(days=36525)  # 100 years: nobody checks the dates

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class IdentityError(Exception):
    """An identity directory cannot be created or used; the message says why and what to do."""


class FingerprintError(ValueError):
    """Text that is not a fingerprint."""


class PeersFileError(ValueError):
    """A peers file that cannot be used; the message starts with `path:line:` when it can."""


class AuthError(Exception):
    """Authentication failed.  `reason` is one of REASONS (safe to log and to send)."""

    REASONS = frozenset({
        "tls_version",       # the connection is not TLS 1.3
        "server_mismatch",   # the hub's key is not the pinned one
        "bad_certificate",   # a certificate that does not parse or holds an unusable key
        "unknown_key",       # the endpoint's key is not in the peers file
        "bad_signature",     # the signature does not verify over this transcript
        "name_mismatch",     # the endpoint claims a name the peers file does not give its key
    })

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown AuthError reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Fingerprints


def format_fingerprint(digest: bytes) -> str:
    """The text form of a 32-byte fingerprint digest."""
    if len(digest) != FINGERPRINT_BYTES:
        raise ValueError(f"a fingerprint is {FINGERPRINT_BYTES} bytes, got {len(digest)}")
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_fingerprint(text: str) -> bytes:
    """The 32-byte digest in `text` ("SHA256:..." or the bare base64); FingerprintError if not."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    body = text.strip()
    if body[: len(FINGERPRINT_PREFIX)].upper() == FINGERPRINT_PREFIX.upper():
        body = body[len(FINGERPRINT_PREFIX) :]
    elif ":" in body:
        raise FingerprintError(
            f"not a SHA256 fingerprint: {shown!r} (expected 'SHA256:' and 43 base64 characters)"
        )
    body = body.rstrip("=")
    if len(body) != 43:
        raise FingerprintError(
            f"fingerprint {shown!r} has {len(body)} base64 characters, expected 43"
        )
    try:
        digest = base64.b64decode(body + "=", validate=True)
    except binascii.Error:
        raise FingerprintError(
            f"fingerprint {shown!r} is not base64 (A-Z a-z 0-9 + /)"
        ) from None
    if format_fingerprint(digest) != FINGERPRINT_PREFIX + body:
        # The last character carries 2 unused bits; a typo there would otherwise be ignored.
        raise FingerprintError(f"fingerprint {shown!r} is not canonical base64 (typo at the end?)")
    return digest


def _spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _certificate_key(der: bytes) -> PublicKey:
    """The public key of a DER certificate; ValueError if it does not parse or is unusable."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not a usable X.509 certificate: {error}") from None
    _check_key_type(public_key)
    return public_key  # type: ignore[return-value]


def _check_key_type(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC key on curve {key.curve.name}, expected secp256r1 (P-256)")
        return
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return
    raise ValueError(f"{type(key).__name__} keys are not supported (P-256 or Ed25519 only)")


def _certificate_digest(der: bytes) -> bytes:
    return hashlib.sha256(_spki_der(_certificate_key(der))).digest()


def fingerprint_of_certificate(der: bytes) -> str:
    """"SHA256:" + base64 of sha256(SubjectPublicKeyInfo) of a DER certificate's key."""
    return format_fingerprint(_certificate_digest(der))


# ---------------------------------------------------------------------------------------------
# Identities on disk


@dataclass(frozen=True)
class Identity:
    """A node's key pair as loaded from its directory.  Paths kept for `ssl.load_cert_chain`."""

    private_key: PrivateKey
    certificate_der: bytes
    fingerprint: str
    key_path: Path
    cert_path: Path

    @property
    def fingerprint_bytes(self) -> bytes:
        return parse_fingerprint(self.fingerprint)


def _self_signed_certificate(key: PrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .sign(key, algorithm)
    )


def _write_temporary(directory: Path, final_name: str, data: bytes, mode: int) -> Path:
    """A new file in `directory`, created with `mode` (never wider), written and synced."""
    path = directory / f".{final_name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_identity(
    directory: Path, *, common_name: str = "vhostvpn", force: bool = False
) -> Identity:
    """Create a P-256 key and its self-signed certificate in `directory` (made 0700 if new).

    Refuses to replace an existing key unless `force`: peers pinned its fingerprint.  The key
    file is created 0600 under a temporary name and linked into place, so `key.pem` is never
    readable by others nor ever half-written.
    """
    directory = Path(directory)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if directory.exists() and not directory.is_dir():
        raise IdentityError(f"{directory} exists and is not a directory")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    if not force and (key_path.exists() or key_path.is_symlink()):
        raise IdentityError(
            f"{key_path} already exists; refusing to replace a private key (peers have pinned "
            f"its fingerprint). Use --force to replace it."
        )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed_certificate(key, common_name)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)

    key_tmp = _write_temporary(directory, KEY_FILE, key_pem, 0o600)
    cert_tmp: Path | None = None
    try:
        cert_tmp = _write_temporary(directory, CERT_FILE, cert_pem, 0o644)
        if force:
            os.replace(key_tmp, key_path)
        else:
            try:
                os.link(key_tmp, key_path)  # the commit point: fails if a key appeared meanwhile
            except FileExistsError:
                raise IdentityError(
                    f"{key_path} appeared while generating; refusing to replace it"
                ) from None
        os.replace(cert_tmp, cert_path)
    finally:
        key_tmp.unlink(missing_ok=True)
        if cert_tmp is not None:
            cert_tmp.unlink(missing_ok=True)
    _fsync_directory(directory)

    certificate_der = certificate.public_bytes(serialization.Encoding.DER)
    return Identity(
        private_key=key,
        certificate_der=certificate_der,
        fingerprint=fingerprint_of_certificate(certificate_der),
        key_path=key_path,
        cert_path=cert_path,
    )


def _read_file(path: Path, what: str, *, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IdentityError(
            f"{what} {path} does not exist (create an identity with `vhostvpn keygen DIR`)"
        ) from None
    except PermissionError:
        raise IdentityError(f"cannot read {what} {path}: permission denied") from None
    except OSError as error:
        raise IdentityError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(f"{what} {path} is not a regular file")
        if private and info.st_mode & 0o077:
            raise IdentityError(
                f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}: a private key must "
                f"not be accessible to group or others (chmod 600 {path})"
            )
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise IdentityError(f"cannot read {what} {path}: {error.strerror}") from None
    finally:
        os.close(fd)


def load_identity(directory: Path) -> Identity:
    """The identity in `directory`; IdentityError says what is missing, unsafe or broken."""
    directory = Path(directory)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    key_pem = _read_file(key_path, "private key", private=True)
    cert_pem = _read_file(cert_path, "certificate", private=False)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise IdentityError(f"{key_path} is encrypted; vhostvpn keys have no passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise IdentityError(f"{key_path} is not a PEM private key: {error}") from None
    try:
        _check_key_type(key)
    except ValueError as error:
        raise IdentityError(f"{key_path}: {error}") from None
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        certificate_der = certificate.public_bytes(serialization.Encoding.DER)
        certificate_key = _certificate_key(certificate_der)
    except ValueError as error:
        raise IdentityError(f"{cert_path} is not a PEM certificate: {error}") from None
    if _spki_der(key.public_key()) != _spki_der(certificate_key):  # type: ignore[arg-type]
        raise IdentityError(
            f"{cert_path} does not belong to {key_path} (different public keys); "
            f"regenerate with `vhostvpn keygen --force` or restore the matching pair"
        )
    return Identity(
        private_key=key,  # type: ignore[arg-type]
        certificate_der=certificate_der,
        fingerprint=fingerprint_of_certificate(certificate_der),
        key_path=key_path,
        cert_path=cert_path,
    )


# For the CLI: `vhostvpn keygen DIR` and `vhostvpn fingerprint DIR` print what these return.


def keygen(directory: Path, *, force: bool = False, common_name: str = "vhostvpn") -> str:
    """Create the identity in `directory`; its fingerprint, to pin or to add to a peers file."""
    return generate_identity(directory, common_name=common_name, force=force).fingerprint


def identity_fingerprint(directory: Path) -> str:
    """The fingerprint of the identity in `directory` (fully loaded and checked)."""
    return load_identity(directory).fingerprint


# ---------------------------------------------------------------------------------------------
# The hub's peers file: `name fingerprint` per line


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"peer name {name!r} is not 1-{MAX_NAME_BYTES} characters of A-Z a-z 0-9 . _ @ + - "
            f"starting with a letter or digit"
        )


class Peers:
    """Who may join the hub: fingerprint <-> name, both unique.

    File format: one `name fingerprint` per line; `#` starts a comment; blank lines are fine.
    """

    __slots__ = ("_fingerprint_by_name", "_name_by_fingerprint")

    def __init__(self, entries: Iterable[tuple[str, bytes]] = ()) -> None:
        self._name_by_fingerprint: dict[bytes, str] = {}
        self._fingerprint_by_name: dict[str, bytes] = {}
        for name, digest in entries:
            _check_name(name)
            if len(digest) != FINGERPRINT_BYTES:
                raise ValueError(f"fingerprint for {name!r} is {len(digest)} bytes, expected 32")
            if name in self._fingerprint_by_name:
                raise ValueError(f"duplicate peer name {name!r}")
            if digest in self._name_by_fingerprint:
                other = self._name_by_fingerprint[digest]
                raise ValueError(f"{name!r} has the same key as {other!r}")
            self._name_by_fingerprint[digest] = name
            self._fingerprint_by_name[name] = digest

    @classmethod
    def parse(cls, text: str, *, source: str = "peers file") -> Peers:
        """Parse a peers file's text; PeersFileError names `source` and the line."""
        entries: list[tuple[str, bytes]] = []
        line_of_name: dict[str, int] = {}
        line_of_fingerprint: dict[bytes, tuple[int, str]] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{source}:{number}"
            if len(fields) != 2:
                raise PeersFileError(
                    f"{where}: expected 'name fingerprint', found {len(fields)} fields"
                )
            name, text_fingerprint = fields
            try:
                _check_name(name)
                digest = parse_fingerprint(text_fingerprint)
            except ValueError as error:
                raise PeersFileError(f"{where}: {error}") from None
            if name in line_of_name:
                raise PeersFileError(
                    f"{where}: duplicate name {name!r} (first on line {line_of_name[name]})"
                )
            if digest in line_of_fingerprint:
                first, other = line_of_fingerprint[digest]
                raise PeersFileError(
                    f"{where}: fingerprint {format_fingerprint(digest)} already belongs to "
                    f"{other!r} on line {first}"
                )
            line_of_name[name] = number
            line_of_fingerprint[digest] = (number, name)
            entries.append((name, digest))
        return cls(entries)

    @classmethod
    def load(cls, path: Path) -> Peers:
        """Read and parse a peers file.  Refused if group or others may write it (like sshd's
        StrictModes for authorized_keys): whoever can write it can join the network."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise PeersFileError(f"cannot read peers file {path}: {error.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PeersFileError(f"peers file {path} is not a regular file (want a file of "
                                 f"`name fingerprint` lines)")
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o022:
                raise PeersFileError(
                    f"peers file {path} has mode {stat.S_IMODE(mode):04o}: group or others may "
                    f"write it and so add keys (chmod go-w {path})"
                )
            data = file.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PeersFileError(f"peers file {path} is not UTF-8 text: {error}") from None
        return cls.parse(text, source=str(path))

    def lookup(self, digest: bytes) -> str | None:
        """The name configured for this fingerprint, or None."""
        return self._name_by_fingerprint.get(digest)

    def fingerprint_of(self, name: str) -> bytes | None:
        return self._fingerprint_by_name.get(name)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._fingerprint_by_name)

    def removed_since(self, old: Peers) -> set[str]:
        """Names in `old` whose key no longer joins under that name: deleted, re-keyed or
        renamed.  On reload the hub closes these sessions."""
        return {
            name
            for name, digest in old._fingerprint_by_name.items()
            if self._name_by_fingerprint.get(digest) != name
        }

    def __len__(self) -> int:
        return len(self._fingerprint_by_name)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return iter(self._fingerprint_by_name.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Peers):
            return NotImplemented
        return self._fingerprint_by_name == other._fingerprint_by_name

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Peers({sorted(self._fingerprint_by_name)})"


# ---------------------------------------------------------------------------------------------
# TLS


def server_ssl_context(identity: Identity) -> ssl.SSLContext:
    """The hub's context: TLS 1.3 only, presents `identity`, requests no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_NONE
    context.num_tickets = 0  # no resumption: every connection is a full handshake
    try:
        # OpenSSL re-reads the files and checks the key matches the certificate.
        context.load_cert_chain(identity.cert_path, identity.key_path)
    except (OSError, ssl.SSLError) as error:
        raise IdentityError(
            f"cannot load {identity.cert_path} / {identity.key_path} into TLS: {error}"
        ) from None
    return context


def client_ssl_context(identity: Identity | None = None) -> ssl.SSLContext:
    """The endpoint's context: TLS 1.3 only, no chain or hostname check (the hub is checked
    by `check_server` against the pinned fingerprint).  `identity` is accepted but unused:
    the endpoint authenticates inside the channel, never with a TLS client certificate."""
    del identity
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class TLSConnection(Protocol):
    """What `check_server` needs: ssl.SSLObject, ssl.SSLSocket and trio.SSLStream all fit."""

    def version(self) -> str | None: ...

    def getpeercert(self, binary_form: bool = ...) -> object: ...


def check_server(tls: TLSConnection, expected: bytes) -> str:
    """After the handshake, on the endpoint: the hub's fingerprint if it is `expected`.

    Raises AuthError ('tls_version', 'bad_certificate', 'server_mismatch'); the caller then
    closes the connection without sending anything.
    """
    if len(expected) != FINGERPRINT_BYTES:
        raise ValueError(f"pinned fingerprint is {len(expected)} bytes, expected 32")
    version = tls.version()
    if version != "TLSv1.3":
        raise AuthError("tls_version", f"negotiated {version}, expected TLSv1.3")
    der = tls.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise AuthError("bad_certificate", "the hub presented no certificate")
    try:
        digest = _certificate_digest(der)
    except ValueError as error:
        raise AuthError("bad_certificate", f"hub certificate: {error}") from None
    if not hmac.compare_digest(digest, expected):
        raise AuthError(
            "server_mismatch",
            f"hub key is {format_fingerprint(digest)}, pinned {format_fingerprint(expected)}",
        )
    return format_fingerprint(digest)


# ---------------------------------------------------------------------------------------------
# Endpoint authentication inside the channel


def client_auth_transcript(
    challenge: bytes, server_fp: bytes, client_fp: bytes, name: str
) -> bytes:
    """What the endpoint signs: domain tag | challenge | hub fp | endpoint fp | u16 len | name.

    Fixed-length fields and a length-prefixed name: no two inputs give the same bytes.
    `name` may be "" (the endpoint claims no name).
    """
    if len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"challenge is {len(challenge)} bytes, expected {CHALLENGE_BYTES}")
    if len(server_fp) != FINGERPRINT_BYTES or len(client_fp) != FINGERPRINT_BYTES:
        raise ValueError(
            f"fingerprints are {len(server_fp)} and {len(client_fp)} bytes, expected 32"
        )
    encoded_name = name.encode("utf-8")
    if len(encoded_name) > MAX_NAME_BYTES:
        raise ValueError(f"name is {len(encoded_name)} bytes, at most {MAX_NAME_BYTES}")
    return b"".join((
        CLIENT_AUTH_DOMAIN,
        challenge,
        server_fp,
        client_fp,
        struct.pack(">H", len(encoded_name)),
        encoded_name,
    ))


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _verify(key: PublicKey, signature: bytes, data: bytes) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, data)
    else:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def sign_client_auth(
    identity: Identity, challenge: bytes, server_fp: bytes, name: str = ""
) -> tuple[bytes, bytes]:
    """The endpoint's AUTH answer: (certificate DER, signature).

    `server_fp` must be what `check_server` measured on this connection, never a value
    taken from a message: that is what keeps the signature useless to any other hub.
    """
    transcript = client_auth_transcript(challenge, server_fp, identity.fingerprint_bytes, name)
    return identity.certificate_der, _sign(identity.private_key, transcript)


def verify_client_auth(
    peers: Peers,
    certificate_der: bytes,
    signature: bytes,
    challenge: bytes,
    server_fp: bytes,
    name: str = "",
) -> str:
    """On the hub: the peer's configured name, or AuthError.

    `challenge` is the one this hub sent on this connection and `server_fp` the hub's own
    fingerprint.  Cheap checks first: the key is looked up before any signature is verified.
    Reasons: 'bad_certificate', 'unknown_key', 'name_mismatch', 'bad_signature'.
    """
    if len(challenge) != CHALLENGE_BYTES or len(server_fp) != FINGERPRINT_BYTES:
        raise ValueError("challenge and hub fingerprint must be 32 bytes each")
    if not certificate_der or len(certificate_der) > MAX_CERTIFICATE_BYTES:
        raise AuthError(
            "bad_certificate",
            f"{len(certificate_der)} bytes, expected 1-{MAX_CERTIFICATE_BYTES}",
        )
    try:
        public_key = _certificate_key(certificate_der)
    except ValueError as error:
        raise AuthError("bad_certificate", str(error)) from None
    client_fp = hashlib.sha256(_spki_der(public_key)).digest()
    configured = peers.lookup(client_fp)
    if configured is None:
        raise AuthError("unknown_key", f"{format_fingerprint(client_fp)} is not in the peers file")
    if name and not NAME_PATTERN.fullmatch(name):
        raise AuthError("name_mismatch", f"claimed name {name[:80]!r} is not a valid peer name")
    if not signature or len(signature) > MAX_SIGNATURE_BYTES:
        raise AuthError(
            "bad_signature", f"{len(signature)} bytes, expected 1-{MAX_SIGNATURE_BYTES}"
        )
    transcript = client_auth_transcript(challenge, server_fp, client_fp, name)
    try:
        _verify(public_key, signature, transcript)
    except InvalidSignature:
        raise AuthError(
            "bad_signature", f"for {configured} ({format_fingerprint(client_fp)})"
        ) from None
    if name and name != configured:
        raise AuthError(
            "name_mismatch", f"key {format_fingerprint(client_fp)} is {configured!r}, not {name!r}"
        )
    return configured
