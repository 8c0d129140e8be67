"""Trusted artifacts: what a model version must satisfy before its bytes reach ONNX Runtime.

- Files: only regular files, whose real path lies inside the model repository (a symlink to
  /dev/zero or out of the repository is refused), opened without following a final symlink and
  without blocking (a FIFO cannot hang loading), and read up to a size limit.
- Signatures (optional): with trusted Ed25519 public keys configured, `manifest.json.sig` must be
  a valid signature by one of them over the exact bytes of manifest.json, which carries the
  sha256 of model.onnx: an unsigned or mis-signed version is refused.
- Binding: the decision constants in the manifest must equal the copy the graph carries in its
  ONNX metadata (`models.manifest.Binding`), so editing the manifest cannot move a decision.

Every failure raises `ModelLoadError` with the reason the operator reads in the log and in
`GET /v1/models`. No web imports.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from models.manifest import BINDING_KEY, SIGNATURE_FILE, Binding, Manifest

MAX_SIGNATURE_BYTES = 1024


class ModelLoadError(Exception):
    """A model version was refused; the message says why, for the operator's log."""


@dataclass(frozen=True)
class ArtifactPolicy:
    """What a version must satisfy; built from the settings (`Settings.artifact_policy()`)."""

    root: Path | None = None  # the model repository; None: the version directory's parent's parent
    max_model_bytes: int = 1 << 30
    max_manifest_bytes: int = 1 << 20
    trusted_keys: tuple[str, ...] = ()  # base64 raw Ed25519 public keys

    def public_keys(self) -> list[tuple[str, Ed25519PublicKey]]:
        return [
            (key_id(k), Ed25519PublicKey.from_public_bytes(decode_key(k)))
            for k in self.trusted_keys
        ]


def decode_key(text: str) -> bytes:
    """A base64 raw Ed25519 public key -> its 32 bytes (ValueError otherwise)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return raw


def key_id(text: str) -> str:
    """A short, stable name for a public key in logs: the first 16 hex digits of its sha256."""
    return hashlib.sha256(decode_key(text)).hexdigest()[:16]


def inside(path: Path, root: Path, label: str | None = None) -> Path:
    """The real path of `path`, which must lie inside `root` (symlinks resolved)."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        # Where it points is for the operator's log; the reason is shown to clients too.
        raise ModelLoadError(f"{label or path.name} resolves outside the model repository")
    return real


def read_regular(path: Path, root: Path, limit: int) -> bytes:
    """The bytes of `path`: a regular file inside `root` of at most `limit` bytes."""
    name = path.name
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    real = inside(path, root)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOFOLLOW: the resolved path
        # must not have become a symlink since.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"cannot open {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{name} is not a regular file")
        if info.st_size > limit:
            raise ModelLoadError(f"{name} has {info.st_size} bytes, over the limit of {limit}")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # it grew while being read
                raise ModelLoadError(f"{name} is over the limit of {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_signature(directory: Path, root: Path, manifest: bytes, policy: ArtifactPolicy) -> str:
    """Verify `manifest.json.sig` over `manifest`; return the id of the key that signed it."""
    try:
        text = read_regular(directory / SIGNATURE_FILE, root, MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        raise ModelLoadError(
            f"unsigned: {SIGNATURE_FILE} is missing and trusted keys are configured"
        ) from None
    try:
        signature = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        signature = b""
    if len(signature) != 64:
        raise ModelLoadError(f"bad signature: {SIGNATURE_FILE} is not a base64 Ed25519 signature")
    for ident, key in policy.public_keys():
        try:
            key.verify(signature, manifest)
        except InvalidSignature:
            continue
        return ident
    raise ModelLoadError(
        f"bad signature: {SIGNATURE_FILE} does not verify manifest.json with any trusted key"
    )


def parse_manifest(data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        # A bounded reason: the first few errors, without the offending values.
        errors = exc.errors(include_url=False, include_input=False)
        shown = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])[:80]}: {e['msg'][:160]}" for e in errors[:3]
        )
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ModelLoadError(f"manifest.json is invalid: {shown}{more}") from None
    except ValueError as exc:
        raise ModelLoadError(f"manifest.json is invalid: {str(exc)[:200]}") from None


def check_binding(metadata: dict[str, str], manifest: Manifest) -> None:
    """The graph's copy of the decision constants must equal the manifest's."""
    carried = metadata.get(BINDING_KEY)
    if carried is None:
        raise ModelLoadError(
            f"the graph carries no {BINDING_KEY} metadata (an artifact from before binding): "
            "bind it with `rcegate stamp <name>/<version>`"
        )
    try:
        bound = Binding.model_validate_json(carried)
    except (ValidationError, ValueError):
        raise ModelLoadError(f"the graph's {BINDING_KEY} metadata is invalid") from None
    differing = manifest.binding().differences(bound)
    if differing:
        raise ModelLoadError(
            f"manifest disagrees with the graph's bound {', '.join(differing)}: "
            "manifest.json was edited or belongs to another graph"
        )
