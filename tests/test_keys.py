"""tunnel.keys: identities on disk, fingerprints, the peers file, endpoint auth signatures, and
the TLS contexts in a real TLS 1.3 handshake (trio.SSLStream over an in-memory stream pair and
over loopback TCP)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tunnel import keys
from tunnel.keys import (
    AuthError,
    FingerprintError,
    IdentityError,
    Peers,
    PeersFileError,
    check_server,
    client_auth_transcript,
    client_ssl_context,
    fingerprint_of_certificate,
    format_fingerprint,
    generate_identity,
    load_identity,
    parse_fingerprint,
    server_ssl_context,
    sign_client_auth,
    verify_client_auth,
)

CHALLENGE = bytes(range(32))
OTHER_CHALLENGE = bytes(range(1, 33))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def hub_identity(tmp_path_factory: pytest.TempPathFactory) -> keys.Identity:
    return generate_identity(tmp_path_factory.mktemp("ids") / "hub", common_name="hub")


@pytest.fixture(scope="module")
def endpoint_identity(tmp_path_factory: pytest.TempPathFactory) -> keys.Identity:
    return generate_identity(tmp_path_factory.mktemp("ids") / "laptop")


@pytest.fixture(scope="module")
def stranger_identity(tmp_path_factory: pytest.TempPathFactory) -> keys.Identity:
    return generate_identity(tmp_path_factory.mktemp("ids") / "stranger")


# --- identities on disk ------------------------------------------------------------------------


def test_keygen_then_load_gives_the_same_identity(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "id"
    made = generate_identity(directory)
    loaded = load_identity(directory)
    assert loaded.fingerprint == made.fingerprint
    assert loaded.certificate_der == made.certificate_der
    assert loaded.fingerprint == fingerprint_of_certificate(loaded.certificate_der)
    assert loaded.fingerprint.startswith("SHA256:") and len(loaded.fingerprint) == 7 + 43
    assert loaded.key_path == directory / keys.KEY_FILE
    assert isinstance(loaded.private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded.private_key.curve, ec.SECP256R1)
    assert keys.identity_fingerprint(directory) == made.fingerprint


def test_keygen_creates_directory_0700_and_key_0600(tmp_path: Path) -> None:
    directory = tmp_path / "id"
    generate_identity(directory)
    assert mode_of(directory) == 0o700
    assert mode_of(directory / keys.KEY_FILE) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == [keys.CERT_FILE, keys.KEY_FILE]


def test_key_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_identity(tmp_path / "id")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "id" / keys.KEY_FILE) == 0o600
    assert mode_of(tmp_path / "id") == 0o700


def test_keygen_leaves_an_existing_directory_mode_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    generate_identity(tmp_path)
    assert mode_of(tmp_path) == 0o755
    assert mode_of(tmp_path / keys.KEY_FILE) == 0o600


def test_keygen_refuses_to_replace_a_key_without_force(tmp_path: Path) -> None:
    first = generate_identity(tmp_path)
    with pytest.raises(IdentityError, match="already exists"):
        generate_identity(tmp_path)
    assert load_identity(tmp_path).fingerprint == first.fingerprint
    second = generate_identity(tmp_path, force=True)
    assert second.fingerprint != first.fingerprint
    assert load_identity(tmp_path).fingerprint == second.fingerprint
    assert mode_of(tmp_path / keys.KEY_FILE) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_keygen_cli_helper_returns_the_fingerprint(tmp_path: Path) -> None:
    printed = keys.keygen(tmp_path / "id")
    assert printed == load_identity(tmp_path / "id").fingerprint
    with pytest.raises(IdentityError, match="--force"):
        keys.keygen(tmp_path / "id")


def test_keygen_refuses_a_file_in_place_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("x")
    with pytest.raises(IdentityError, match="not a directory"):
        generate_identity(tmp_path / "id")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o601], ids=oct)
def test_load_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    generate_identity(tmp_path)
    (tmp_path / keys.KEY_FILE).chmod(mode)
    with pytest.raises(IdentityError, match=f"mode {mode:04o}.*chmod 600"):
        load_identity(tmp_path)


def test_load_accepts_a_read_only_key(tmp_path: Path) -> None:
    made = generate_identity(tmp_path)
    (tmp_path / keys.KEY_FILE).chmod(0o400)
    loaded = load_identity(tmp_path)
    assert (loaded.fingerprint, loaded.certificate_der) == (made.fingerprint, made.certificate_der)
    assert loaded.private_key.private_numbers() == made.private_key.private_numbers()
    assert loaded.key_path == tmp_path / keys.KEY_FILE
    assert mode_of(loaded.key_path) == 0o400  # loading reads; it does not "fix" the mode


def test_load_reports_a_missing_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=r"does not exist.*vhostvpn keygen"):
        load_identity(tmp_path)
    generate_identity(tmp_path)
    (tmp_path / keys.CERT_FILE).unlink()
    with pytest.raises(IdentityError, match=r"certificate .*cert.pem does not exist"):
        load_identity(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_reports_an_unreadable_key(tmp_path: Path) -> None:
    generate_identity(tmp_path)
    (tmp_path / keys.KEY_FILE).chmod(0o000)
    with pytest.raises(IdentityError, match="permission denied"):
        load_identity(tmp_path)


def test_load_refuses_a_key_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / keys.KEY_FILE).mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="private key"):
        load_identity(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_load_reports_a_corrupt_key(tmp_path: Path, content: bytes) -> None:
    generate_identity(tmp_path)
    (tmp_path / keys.KEY_FILE).write_bytes(content)
    with pytest.raises(IdentityError, match="is not a PEM private key"):
        load_identity(tmp_path)


def test_load_reports_a_corrupt_certificate(tmp_path: Path) -> None:
    generate_identity(tmp_path)
    pem = (tmp_path / keys.CERT_FILE).read_bytes()
    (tmp_path / keys.CERT_FILE).write_bytes(pem[:100] + pem[-30:])
    with pytest.raises(IdentityError, match="is not a PEM certificate"):
        load_identity(tmp_path)


def test_load_reports_a_certificate_of_another_key(tmp_path: Path) -> None:
    generate_identity(tmp_path / "a")
    generate_identity(tmp_path / "b")
    shutil.copy(tmp_path / "b" / keys.CERT_FILE, tmp_path / "a" / keys.CERT_FILE)
    with pytest.raises(IdentityError, match="does not belong to"):
        load_identity(tmp_path / "a")


def test_load_refuses_an_encrypted_key(tmp_path: Path) -> None:
    generate_identity(tmp_path)
    key = serialization.load_pem_private_key((tmp_path / keys.KEY_FILE).read_bytes(), None)
    (tmp_path / keys.KEY_FILE).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(IdentityError, match="encrypted"):
        load_identity(tmp_path)


def test_load_refuses_an_rsa_key(tmp_path: Path) -> None:
    generate_identity(tmp_path)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / keys.KEY_FILE).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match=r"RSA.*not supported"):
        load_identity(tmp_path)


def write_ed25519_identity(directory: Path) -> None:
    """A hand-made Ed25519 identity: accepted on load, though keygen makes P-256."""
    directory.mkdir(mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    certificate = keys._self_signed_certificate(key, "ed")
    fd = os.open(directory / keys.KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    (directory / keys.CERT_FILE).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_subject_public_key_info(
    endpoint_identity: keys.Identity,
) -> None:
    certificate = x509.load_der_x509_certificate(endpoint_identity.certificate_der)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(spki).digest()
    assert endpoint_identity.fingerprint == "SHA256:" + base64.b64encode(digest).decode().rstrip(
        "="
    )
    assert endpoint_identity.fingerprint_bytes == digest


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_fingerprint_matches_the_openssl_command_line(endpoint_identity: keys.Identity) -> None:
    """The recipe docs/keys.md gives for checking a fingerprint by hand."""
    pem = endpoint_identity.cert_path.read_bytes()
    spki = subprocess.run(
        ["openssl", "x509", "-pubkey", "-noout"], input=pem, capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=spki,
        capture_output=True,
        check=True,
    ).stdout
    by_hand = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert by_hand == endpoint_identity.fingerprint


def test_parse_fingerprint_accepts_prefix_bare_padded_and_spaces() -> None:
    digest = hashlib.sha256(b"x").digest()
    text = format_fingerprint(digest)
    bare = text.removeprefix("SHA256:")
    for variant in (text, bare, bare + "=", f"  {text}\n", "sha256:" + bare):
        assert parse_fingerprint(variant) == digest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "0 base64 characters"),
        ("SHA256:abc", "3 base64 characters, expected 43"),
        ("MD5:" + "A" * 43, "not a SHA256 fingerprint"),
        ("SHA256:" + "!" * 43, "not base64"),
        ("SHA256:" + "-" * 43, "not base64"),
        ("SHA256:" + "A" * 42 + "B", "not canonical"),
        ("SHA256:" + "A" * 44, "44 base64 characters"),
    ],
)
def test_parse_fingerprint_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(FingerprintError, match=message):
        parse_fingerprint(text)


def test_fingerprint_of_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"not a usable X.509 certificate"):
        fingerprint_of_certificate(b"\x30\x03\x02\x01\x00")


# --- the peers file ----------------------------------------------------------------------------


def fp(seed: str) -> str:
    return format_fingerprint(hashlib.sha256(seed.encode()).digest())


def test_peers_file_with_comments_and_blank_lines() -> None:
    text = f"""
# the office
laptop {fp("a")}   # Alice's laptop
   build-01   {fp("b")}

vm.test@lab {fp("c")}
"""
    peers = Peers.parse(text)
    assert peers.names == {"laptop", "build-01", "vm.test@lab"}
    assert len(peers) == 3
    assert peers.lookup(parse_fingerprint(fp("b"))) == "build-01"
    assert peers.lookup(hashlib.sha256(b"nobody").digest()) is None
    assert peers.fingerprint_of("laptop") == parse_fingerprint(fp("a"))


def test_an_empty_peers_file_admits_no_one() -> None:
    peers = Peers.parse("# nobody yet\n")
    assert len(peers) == 0 and peers.names == frozenset()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"a {fp('a')}\nb {fp('b')}\na {fp('c')}\n",
            r"peers:3: duplicate name 'a' \(first on line 1\)",
        ),
        (
            f"a {fp('a')}\n\nb {fp('a')}\n",
            r"peers:3: fingerprint .* already belongs to 'a' on line 1",
        ),
        (f"a {fp('a')}\nb SHA256:nope\n", r"peers:2: fingerprint 'SHA256:nope' has 4 base64"),
        (f"a {fp('a')} extra\n", "peers:1: expected 'name fingerprint', found 3 fields"),
        ("lonely\n", "peers:1: expected 'name fingerprint', found 1 fields"),
        (f"-x {fp('a')}\n", "peers:1: peer name '-x' is not"),
        (f"{'n' * 65} {fp('a')}\n", "peers:1: peer name"),
        (f"caf\u00e9 {fp('a')}\n", "peers:1: peer name"),
    ],
)
def test_peers_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(PeersFileError, match=message):
        Peers.parse(text, source="peers")


def test_peers_load_reads_a_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text(f"a {fp('a')}\n")
    path.chmod(0o644)
    assert Peers.load(path).names == {"a"}
    path.write_text(f"a {fp('a')}\nb bad\n")
    with pytest.raises(PeersFileError, match=f"{path}:2: "):
        Peers.load(path)


def test_peers_load_refuses_a_file_others_can_write(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text(f"a {fp('a')}\n")
    path.chmod(0o664)
    with pytest.raises(PeersFileError, match=r"mode 0664.*chmod go-w"):
        Peers.load(path)


def test_peers_load_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PeersFileError, match=r"cannot read peers file .*No such file"):
        Peers.load(tmp_path / "nope")


def test_removed_since_names_deleted_rekeyed_and_renamed_peers() -> None:
    old = Peers.parse(f"keep {fp('1')}\ngone {fp('2')}\nrekeyed {fp('3')}\nrenamed {fp('4')}\n")
    new = Peers.parse(f"keep {fp('1')}\nrekeyed {fp('33')}\nnew-name {fp('4')}\nfresh {fp('5')}\n")
    assert new.removed_since(old) == {"gone", "rekeyed", "renamed"}
    assert old.removed_since(old) == set()
    reordered = f"renamed {fp('4')}\nkeep {fp('1')}\nrekeyed {fp('3')}\ngone {fp('2')}"
    assert old == Peers.parse(reordered)
    assert old != new


# --- endpoint authentication -------------------------------------------------------------------


@pytest.fixture(scope="module")
def peers(endpoint_identity: keys.Identity) -> Peers:
    return Peers.parse(f"laptop {endpoint_identity.fingerprint}\nother {fp('other')}\n")


def test_transcript_layout() -> None:
    server, client = b"S" * 32, b"C" * 32
    transcript = client_auth_transcript(CHALLENGE, server, client, "laptop")
    assert transcript == (
        b"vhostvpn client auth v1\0" + CHALLENGE + server + client + b"\x00\x06laptop"
    )
    with pytest.raises(ValueError, match="challenge is 31 bytes"):
        client_auth_transcript(CHALLENGE[:31], server, client, "")
    with pytest.raises(ValueError, match="at most 64"):
        client_auth_transcript(CHALLENGE, server, client, "x" * 65)


def test_good_signature_names_the_peer(
    peers: Peers, endpoint_identity: keys.Identity, hub_identity: keys.Identity
) -> None:
    hub_fp = hub_identity.fingerprint_bytes
    for claimed in ("laptop", ""):
        der, signature = sign_client_auth(endpoint_identity, CHALLENGE, hub_fp, claimed)
        assert der == endpoint_identity.certificate_der
        assert verify_client_auth(peers, der, signature, CHALLENGE, hub_fp, claimed) == "laptop"


def test_unknown_key_is_refused(
    peers: Peers, stranger_identity: keys.Identity, hub_identity: keys.Identity
) -> None:
    hub_fp = hub_identity.fingerprint_bytes
    der, signature = sign_client_auth(stranger_identity, CHALLENGE, hub_fp, "laptop")
    with pytest.raises(AuthError, match=re.escape(stranger_identity.fingerprint)) as caught:
        verify_client_auth(peers, der, signature, CHALLENGE, hub_fp, "laptop")
    assert caught.value.reason == "unknown_key"


@pytest.mark.parametrize("changed", ["challenge", "server_fp", "name"])
def test_signature_over_another_transcript_is_refused(
    peers: Peers, endpoint_identity: keys.Identity, hub_identity: keys.Identity, changed: str
) -> None:
    """Each signed field matters: a replay on a new challenge, a signature made for another
    hub, or a name swapped after signing all fail."""
    hub_fp = hub_identity.fingerprint_bytes
    signed = {"challenge": CHALLENGE, "server_fp": hub_fp, "name": ""}
    checked = dict(signed)
    checked[changed] = {
        "challenge": OTHER_CHALLENGE,
        "server_fp": hashlib.sha256(b"another hub").digest(),
        "name": "laptop",
    }[changed]
    der, signature = sign_client_auth(endpoint_identity, **signed)
    with pytest.raises(AuthError) as caught:
        verify_client_auth(peers, der, signature, **checked)
    assert caught.value.reason == "bad_signature"


def test_a_signature_by_another_key_with_a_known_certificate_is_refused(
    peers: Peers,
    endpoint_identity: keys.Identity,
    stranger_identity: keys.Identity,
    hub_identity: keys.Identity,
) -> None:
    """Presenting a member's (public) certificate does not help without its private key."""
    hub_fp = hub_identity.fingerprint_bytes
    transcript = client_auth_transcript(
        CHALLENGE, hub_fp, endpoint_identity.fingerprint_bytes, ""
    )
    forged = keys._sign(stranger_identity.private_key, transcript)
    with pytest.raises(AuthError) as caught:
        verify_client_auth(
            peers, endpoint_identity.certificate_der, forged, CHALLENGE, hub_fp, ""
        )
    assert caught.value.reason == "bad_signature"


def test_claimed_name_must_be_the_configured_one(
    endpoint_identity: keys.Identity, hub_identity: keys.Identity
) -> None:
    hub_fp = hub_identity.fingerprint_bytes
    peers = Peers.parse(f"laptop {endpoint_identity.fingerprint}\nother {fp('o')}\n")
    for claimed, detail in (("other", "not 'other'"), ("bad name!", "not a valid peer name")):
        der, signature = sign_client_auth(endpoint_identity, CHALLENGE, hub_fp, claimed)
        with pytest.raises(AuthError, match=detail) as caught:
            verify_client_auth(peers, der, signature, CHALLENGE, hub_fp, claimed)
        assert caught.value.reason == "name_mismatch"


@pytest.mark.parametrize(
    "der", [b"", b"garbage", b"\x30\x82\xff\xff", b"\x30" * (keys.MAX_CERTIFICATE_BYTES + 1)]
)
def test_garbage_certificate_is_bad_certificate(
    peers: Peers, hub_identity: keys.Identity, der: bytes
) -> None:
    with pytest.raises(AuthError) as caught:
        verify_client_auth(peers, der, b"sig", CHALLENGE, hub_identity.fingerprint_bytes, "")
    assert caught.value.reason == "bad_certificate"


def test_certificate_with_an_unsupported_key_is_bad_certificate(
    peers: Peers, hub_identity: keys.Identity
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    der = keys._self_signed_certificate(key, "p384").public_bytes(serialization.Encoding.DER)
    with pytest.raises(AuthError, match="secp384r1") as caught:
        verify_client_auth(peers, der, b"sig", CHALLENGE, hub_identity.fingerprint_bytes, "")
    assert caught.value.reason == "bad_certificate"


@pytest.mark.parametrize("cut", ["truncated", "empty", "oversized", "flipped"])
def test_malformed_signature_is_bad_signature(
    peers: Peers, endpoint_identity: keys.Identity, hub_identity: keys.Identity, cut: str
) -> None:
    hub_fp = hub_identity.fingerprint_bytes
    der, signature = sign_client_auth(endpoint_identity, CHALLENGE, hub_fp, "")
    broken = {
        "truncated": signature[:-1],
        "empty": b"",
        "oversized": signature + bytes(keys.MAX_SIGNATURE_BYTES),
        "flipped": signature[:-1] + bytes([signature[-1] ^ 1]),
    }[cut]
    with pytest.raises(AuthError) as caught:
        verify_client_auth(peers, der, broken, CHALLENGE, hub_fp, "")
    assert caught.value.reason == "bad_signature"


def test_ed25519_endpoint_keys_authenticate(tmp_path: Path, hub_identity: keys.Identity) -> None:
    write_ed25519_identity(tmp_path / "ed")
    identity = load_identity(tmp_path / "ed")
    peers = Peers.parse(f"ed {identity.fingerprint}\n")
    hub_fp = hub_identity.fingerprint_bytes
    der, signature = sign_client_auth(identity, CHALLENGE, hub_fp, "ed")
    assert len(signature) == 64
    assert verify_client_auth(peers, der, signature, CHALLENGE, hub_fp, "ed") == "ed"


def test_auth_error_reasons_are_a_closed_set() -> None:
    with pytest.raises(ValueError, match="unknown AuthError reason"):
        AuthError("oops")


# --- TLS ---------------------------------------------------------------------------------------


async def handshake_pair(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> tuple[trio.SSLStream, trio.SSLStream]:
    """Both ends of a TLS handshake over an in-memory stream pair."""
    server_raw, client_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_context, server_side=True)
    client = trio.SSLStream(client_raw, client_context, server_hostname=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def test_tls13_handshake_and_pinned_hub(
    hub_identity: keys.Identity, stranger_identity: keys.Identity
) -> None:
    server, client = await handshake_pair(
        server_ssl_context(hub_identity), client_ssl_context()
    )
    assert client.version() == "TLSv1.3"
    assert server.version() == "TLSv1.3"
    assert check_server(client, hub_identity.fingerprint_bytes) == hub_identity.fingerprint
    pinned_other = re.escape("pinned " + stranger_identity.fingerprint)
    with pytest.raises(AuthError, match=pinned_other) as caught:
        check_server(client, stranger_identity.fingerprint_bytes)
    assert caught.value.reason == "server_mismatch"
    # The hub asked for no client certificate.
    assert server.getpeercert(binary_form=True) is None


async def test_full_authentication_over_loopback_tcp(
    hub_identity: keys.Identity, endpoint_identity: keys.Identity
) -> None:
    """The whole exchange as hub and endpoint will run it, over real 127.0.0.1 TCP: the hub
    sends a challenge, the endpoint checks the pin, signs, and the hub names the peer."""
    peers = Peers.parse(f"laptop {endpoint_identity.fingerprint}\n")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server_context = server_ssl_context(hub_identity)
    result: dict[str, str] = {}

    async def hub() -> None:
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        challenge = os.urandom(keys.CHALLENGE_BYTES)
        await stream.send_all(challenge)  # stands in for wire.py's HELLO
        answer = b""
        while len(answer) < 2:
            answer += await stream.receive_some()
        size = int.from_bytes(answer[:2], "big")
        while len(answer) < 2 + size + 2:
            answer += await stream.receive_some()
        der, rest = answer[2 : 2 + size], answer[2 + size :]
        sig_size = int.from_bytes(rest[:2], "big")
        while len(rest) < 2 + sig_size:
            rest += await stream.receive_some()
        result["hub"] = verify_client_auth(
            peers, der, rest[2:], challenge, hub_identity.fingerprint_bytes, "laptop"
        )
        await stream.aclose()

    async def endpoint() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client_ssl_context(endpoint_identity), server_hostname=None)
        await stream.do_handshake()
        result["pinned"] = check_server(stream, hub_identity.fingerprint_bytes)
        challenge = b""
        while len(challenge) < keys.CHALLENGE_BYTES:
            challenge += await stream.receive_some()
        der, signature = sign_client_auth(
            endpoint_identity, challenge, parse_fingerprint(result["pinned"]), "laptop"
        )
        await stream.send_all(
            len(der).to_bytes(2, "big") + der + len(signature).to_bytes(2, "big") + signature
        )
        await stream.receive_some()  # the hub's close
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub)
            nursery.start_soon(endpoint)
    await listeners[0].aclose()
    assert result == {"hub": "laptop", "pinned": hub_identity.fingerprint}


async def test_a_tls12_only_endpoint_is_refused(hub_identity: keys.Identity) -> None:
    client_context = client_ssl_context()
    client_context.minimum_version = ssl.TLSVersion.TLSv1_2
    client_context.maximum_version = ssl.TLSVersion.TLSv1_2
    server_raw, client_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_ssl_context(hub_identity), server_side=True)
    client = trio.SSLStream(client_raw, client_context, server_hostname=None)
    failures: dict[str, BaseException] = {}

    async def handshake(name: str, stream: trio.SSLStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as error:
            failures[name] = error
            await trio.aclose_forcefully(stream)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake, "hub", server)
            nursery.start_soon(handshake, "endpoint", client)
    assert set(failures) == {"hub", "endpoint"}
    assert "UNSUPPORTED_PROTOCOL" in str(failures["hub"].__cause__)


async def test_our_endpoint_refuses_a_tls12_only_hub(hub_identity: keys.Identity) -> None:
    server_context = server_ssl_context(hub_identity)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server_context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(BaseExceptionGroup) as caught, trio.fail_after(5):
        await handshake_pair(server_context, client_ssl_context())
    assert caught.group_contains(trio.BrokenResourceError)


async def test_ed25519_hub_certificates_work_in_tls13(tmp_path: Path) -> None:
    """keygen makes P-256 (mandatory in TLS 1.3 everywhere); an Ed25519 identity also works
    with this OpenSSL, so hand-made Ed25519 identities load and serve."""
    write_ed25519_identity(tmp_path / "ed")
    identity = load_identity(tmp_path / "ed")
    server, client = await handshake_pair(server_ssl_context(identity), client_ssl_context())
    assert check_server(client, identity.fingerprint_bytes) == identity.fingerprint


def test_check_server_refuses_other_versions_and_missing_certificates(
    hub_identity: keys.Identity,
) -> None:
    class FakeTLS:
        def __init__(self, version: str, der: bytes | None) -> None:
            self._version, self._der = version, der

        def version(self) -> str:
            return self._version

        def getpeercert(self, binary_form: bool = False) -> bytes | None:
            return self._der

    pin = hub_identity.fingerprint_bytes
    cases = [
        (FakeTLS("TLSv1.2", hub_identity.certificate_der), "tls_version"),
        (FakeTLS("TLSv1.3", None), "bad_certificate"),
        (FakeTLS("TLSv1.3", b"junk"), "bad_certificate"),
    ]
    for tls, reason in cases:
        with pytest.raises(AuthError) as caught:
            check_server(tls, pin)
        assert caught.value.reason == reason
    assert check_server(FakeTLS("TLSv1.3", hub_identity.certificate_der), pin)


def test_contexts_are_tls13_only_and_check_no_chain(hub_identity: keys.Identity) -> None:
    server = server_ssl_context(hub_identity)
    client = client_ssl_context()
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_NONE
    assert client.check_hostname is False
    assert server.num_tickets == 0


def test_server_context_reports_a_vanished_identity(tmp_path: Path) -> None:
    identity = generate_identity(tmp_path)
    identity.key_path.unlink()
    with pytest.raises(IdentityError, match="cannot load"):
        server_ssl_context(identity)


@pytest.mark.parametrize("name", ["", "laptop", " " * 64])
def test_one_key_as_hub_and_endpoint_cannot_confuse_signatures(name: str) -> None:
    """TLS 1.3 CertificateVerify input starts with 64 spaces (RFC 8446 4.4.3); what an
    endpoint signs starts with the domain tag, whatever the challenge and the name."""
    assert not keys.CLIENT_AUTH_DOMAIN.startswith(b" ")
    assert keys.CLIENT_AUTH_DOMAIN.endswith(b"\0")
    for challenge in (CHALLENGE, b" " * 32):
        transcript = client_auth_transcript(challenge, b" " * 32, b" " * 32, name)
        assert transcript.startswith(keys.CLIENT_AUTH_DOMAIN)
        assert not transcript.startswith(b" " * 64)


def test_p256_signatures_are_sha256_ecdsa(endpoint_identity: keys.Identity) -> None:
    transcript = client_auth_transcript(CHALLENGE, b"S" * 32, b"C" * 32, "")
    signature = keys._sign(endpoint_identity.private_key, transcript)
    endpoint_identity.private_key.public_key().verify(
        signature, transcript, ec.ECDSA(hashes.SHA256())
    )
