"""The node's Ed25519 signing key: generate, save (0600), load, fingerprint, sign, verify.

Only composes :mod:`cryptography`; no signature scheme is invented here. The private key
is kept as an unencrypted PKCS#8 PEM file readable by its owner only (like an SSH key);
a key file that group or others can read is refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KeyFileError",
    "verify_hex_signature",
    "generate_key",
    "save_private_key",
    "load_private_key",
    "load_or_create_key",
    "public_key_pem",
    "load_public_key",
    "fingerprint",
    "sign",
    "verify_signature",
]


class KeyFileError(Exception):
    """A key file is missing, unreadable, too widely readable or not an Ed25519 key."""


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> Path:
    """Write ``key`` as PKCS#8 PEM with mode 0600; never overwrites an existing file."""
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)  # in case the umask was stricter than needed or the FS ignored the mode
    return path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an Ed25519 private key PEM; refuse files readable by group or others."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist (a node's key is SILO/.node/node_key.pem: pass --silo SILO "
                           "or --key PATH)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create_key(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """Load the key at ``path``, or create it there; returns ``(key, created)``."""
    if Path(path).exists():
        return load_private_key(path), False
    key = generate_key()
    save_private_key(key, path)
    return key, True


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM of the (public half of the) key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from PEM text/bytes or a PEM file path."""
    if isinstance(pem, os.PathLike) or (isinstance(pem, str) and "-----BEGIN" not in pem):
        src = Path(pem)
        try:
            pem = src.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read public key file {src}: {exc.strerror}") from None
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key (stable, short, comparable)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) over ``message``."""
    return key.sign(message)


def verify_signature(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` under ``key``."""
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def verify_hex_signature(key: Ed25519PublicKey, signature_hex: str, message: bytes) -> bool:
    """:func:`verify_signature` for a hex-encoded signature (how ledger heads store it); bad hex is invalid."""
    try:
        sig = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    return verify_signature(key, sig, message)
