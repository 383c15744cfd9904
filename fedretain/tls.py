"""Certificates and node keys for a fedretain deployment, made with ``cryptography`` only.

Flower's SuperLink serves TLS with a server certificate that SuperNodes and the ``flwr``
CLI verify against a CA certificate; node authentication needs one ECDSA key pair per
merchant (a NIST curve, OpenSSH format) whose public half the platform registers.
This module creates a *development* CA, a server certificate for the platform host and
node keys, writes private keys owner-readable only (0600) and never overwrites a file.
Production deployments point the server config at their own certificate files instead;
:func:`check_server_tls` validates either kind before the SuperLink starts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "TLSError",
    "CertPaths",
    "NodeKeyPaths",
    "DEFAULT_HOSTS",
    "init_certs",
    "create_node_key",
    "load_node_public_key",
    "load_node_private_key",
    "public_key_fingerprint",
    "fingerprint_file",
    "check_server_tls",
    "check_root_cert",
    "san_names",
]

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
NODE_CURVE = ec.SECP384R1  # Flower requires a NIST curve; P-384 as in Flower's docs
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class TLSError(Exception):
    """A certificate or key is missing, malformed, expired, or does not match."""


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`init_certs` (``ca_key`` stays on the machine that signs)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """A merchant node's authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path
    fingerprint: str


# -- file helpers ------------------------------------------------------------------------
def _write_new(path: Path, data: bytes, mode: int) -> Path:
    """Create ``path`` with ``mode`` atomically; refuse to overwrite an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.link(tmp, path)  # fails with FileExistsError instead of replacing
    except FileExistsError:
        raise TLSError(f"{path} already exists; refusing to overwrite it (remove it first)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise TLSError(f"cannot read {what} {path}: {exc.strerror}") from None


def _check_private_mode(path: Path, what: str) -> None:
    if os.name == "posix" and Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(Path(path).stat().st_mode)
        raise TLSError(f"{what} {path} is accessible by group/others (mode {mode:04o}); run `chmod 600 {path}`")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- certificates ------------------------------------------------------------------------
def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or "/" in host or ":" in host:
        raise TLSError(f"not a host name or IP address: {host!r}")
    return x509.DNSName(host)


def _hosts(extra: Iterable[str]) -> list[str]:
    out: list[str] = []
    for h in (*DEFAULT_HOSTS, *extra):
        h = h.strip()
        if h and h not in out:
            out.append(h)
    return out


def _make_ca(now: dt.datetime, days: int, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedretain"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], now: dt.datetime, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedretain"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def init_certs(out_dir: str | os.PathLike[str], hosts: Iterable[str] = (), *, days: int = 365,
               ca_name: str = "fedretain development CA") -> CertPaths:
    """Create a development CA and a server certificate for the platform host.

    The server certificate's SAN always holds ``IP:127.0.0.1`` and ``DNS:localhost`` plus
    every entry of ``hosts`` (IP addresses or DNS names of the platform machine, as the
    merchants will dial it). Writes ``ca.crt``, ``ca.key``, ``server.pem`` and
    ``server.key`` into ``out_dir``; refuses to overwrite any of them.
    """
    if days < 1:
        raise TLSError(f"days must be >= 1, got {days}")
    out = Path(out_dir)
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    clash = [str(p) for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if clash:
        raise TLSError(f"refusing to overwrite existing files: {', '.join(clash)}")
    names = _hosts(hosts)
    for h in names:
        _general_name(h)  # validate before writing anything
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _make_ca(now, days, ca_name)
    srv_key, srv_cert = _make_server_cert(ca_key, ca_cert, names, now, days)
    _write_new(paths.ca_key, _key_pem(ca_key), 0o600)
    _write_new(paths.server_key, _key_pem(srv_key), 0o600)
    _write_new(paths.ca_cert, _cert_pem(ca_cert), 0o644)
    _write_new(paths.server_cert, _cert_pem(srv_cert), 0o644)
    return paths


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TLSError(f"{what} {path} is not a PEM certificate: {exc}") from None


def san_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(i) for i in san.get_values_for_type(x509.IPAddress))]


def check_root_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load a CA certificate a node or the CLI will trust; fail clearly if unusable."""
    cert = _load_cert(Path(path), "root certificate")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TLSError(f"root certificate {path} is not valid now "
                       f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})")
    return cert


def check_server_tls(ca_cert: str | os.PathLike[str], server_cert: str | os.PathLike[str],
                     server_key: str | os.PathLike[str], host: str | None = None) -> list[str]:
    """Verify a server certificate before the SuperLink serves it; return its SAN names.

    Checks: files readable and PEM; private key owner-only and matching the certificate;
    certificate issued and signed by the CA, valid now, and (if ``host`` is given and is
    not a wildcard bind address) naming ``host`` in its SAN.
    """
    ca = check_root_cert(ca_cert)
    cert = _load_cert(Path(server_cert), "server certificate")
    key_data = _read(Path(server_key), "server key")
    _check_private_mode(Path(server_key), "server key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSError(f"server key {server_key} is not an unencrypted PEM private key: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
            serialization.Encoding.DER, pub):
        raise TLSError(f"server key {server_key} does not belong to certificate {server_cert}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise TLSError(f"server certificate {server_cert} was not issued by CA {ca_cert}: {exc}") from None
    except Exception as exc:  # InvalidSignature
        raise TLSError(f"server certificate {server_cert} has a bad signature for CA {ca_cert}: {exc!r}") from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TLSError(f"server certificate {server_cert} is not valid now "
                       f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})")
    names = san_names(cert)
    if host and host not in ("0.0.0.0", "::", "") and host not in names:
        raise TLSError(f"server certificate {server_cert} is not valid for {host} (it names: {', '.join(names)}); "
                       f"recreate it with `fedretain certs init --host {host}`")
    return names


# -- node authentication keys ------------------------------------------------------------
def public_key_fingerprint(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """``SHA256:<base64, no padding>`` of the OpenSSH key blob: the form ``ssh-keygen -lf`` prints.

    Operators compare the fingerprint a merchant reads to them with ``ssh-keygen -lf FILE.pub``
    or ``fedretain certs fingerprint FILE.pub``; both must print the same string.
    """
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    blob = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob.split()[1])).digest()).decode().rstrip("=")


def fingerprint_file(path: str | os.PathLike[str]) -> str:
    """The fingerprint of a node-auth public key file (checked as :func:`load_node_public_key` does)."""
    return public_key_fingerprint(load_node_public_key(path))


def create_node_key(out: str | os.PathLike[str], comment: str = "fedretain-platform-node-auth") -> NodeKeyPaths:
    """Create an ECDSA P-384 key pair for Flower node authentication.

    Writes the private key to ``out`` (OpenSSH format, mode 0600) and the public key to
    ``out + ".pub"`` (one OpenSSH line, to register on the platform). Never overwrites.
    """
    priv_path = Path(out)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise TLSError(f"{p} already exists; refusing to overwrite it")
    if any(c.isspace() for c in comment):
        raise TLSError(f"key comment must not contain spaces: {comment!r}")
    key = ec.generate_private_key(NODE_CURVE())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(priv_path, priv, 0o600)
    _write_new(pub_path, pub + b" " + comment.encode() + b"\n", 0o644)
    return NodeKeyPaths(priv_path, pub_path, public_key_fingerprint(key))


def _check_curve(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey, path: Path) -> None:
    if not isinstance(key.curve, _NIST_CURVES):
        raise TLSError(f"{path}: EC curve {key.curve.name} is not a NIST curve (Flower needs P-256/384/521)")


_LEDGER_KEY_HINT = ("this is not a platform node-auth key. A merchant has two keys: the consent-ledger "
                    "signing key (Ed25519, SILO/.node/node_key.pem and node_key.pem.pub, stays with the ledger) and "
                    "the platform node-auth key (ECDSA, OpenSSH format, made by `fedretain certs node-key`, "
                    "comment fedretain-platform-node-auth); register the node-auth key's .pub")


def load_node_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Load a node's OpenSSH public key as Flower will (EC on a NIST curve) or fail clearly.

    The consent-ledger key (an Ed25519 PEM ``node_key.pem.pub``) is the usual wrong file;
    it is recognised and named so the operator knows which file to ask for.
    """
    path = Path(path)
    data = _read(path, "node public key")
    if b"PRIVATE KEY" in data:
        raise TLSError(f"{path} is a PRIVATE key: never send or register it; {_LEDGER_KEY_HINT}")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            pem = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            pem = None
        kind = f"a PEM {type(pem).__name__.lstrip('_')}" if pem is not None else "a PEM file"
        raise TLSError(f"{path} is {kind}, {_LEDGER_KEY_HINT}")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TLSError(f"{path} is not an OpenSSH public key ({exc}); {_LEDGER_KEY_HINT}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TLSError(f"{path} holds a {type(key).__name__.lstrip('_')}: node authentication needs an ECDSA key; "
                       f"{_LEDGER_KEY_HINT}")
    _check_curve(key, path)
    return key


def load_node_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Load a node's OpenSSH private key as ``flower-supernode`` will; refuse loose file modes."""
    path = Path(path)
    data = _read(path, "node key")
    _check_private_mode(path, "node key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TLSError(f"node key {path} is not an unencrypted OpenSSH private key "
                       f"(create one with `fedretain certs node-key`): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"node key {path} holds a {type(key).__name__}; node authentication needs an ECDSA key")
    _check_curve(key, path)
    return key
