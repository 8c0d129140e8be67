"""`rcegate keygen`, `rcegate sign` and `rcegate api-key`: the operator's side of trust and access.

`sign` writes `manifest.json.sig`, a detached Ed25519 signature (base64) over the exact bytes of
manifest.json, which carries the sha256 of model.onnx (and the graph carries the manifest's
decision constants), so one signature covers the whole version. It refuses an artifact whose
model.onnx does not match the manifest. The service verifies signatures against the public keys
in `RCEGATE_TRUSTED_KEYS`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.files import write_text
from models.manifest import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest


class SigningError(Exception):
    """The artifact cannot be signed (it does not verify)."""


def public_key_text(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate_key(path: Path) -> str:
    """Write a new private key (PEM, mode 0600) to `path`; return its public key (base64)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = public_key_text(key)
    write_text(path.with_name(path.name + ".pub"), public + "\n")
    return public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 private key")
    return key


def sign_artifact(directory: Path, key: Ed25519PrivateKey) -> Path:
    """Sign `directory/manifest.json` after checking model.onnx against it."""
    data = (directory / MANIFEST_FILE).read_bytes()
    manifest = Manifest.model_validate_json(data)
    digest = hashlib.sha256((directory / MODEL_FILE).read_bytes()).hexdigest()
    if digest != manifest.sha256:
        raise SigningError(f"{directory / MODEL_FILE}: sha256 does not match the manifest")
    path = directory / SIGNATURE_FILE
    # Atomic: a reader (the service starting) never sees half a signature.
    write_text(path, base64.b64encode(key.sign(data)).decode() + "\n")
    return path


def register(app: typer.Typer) -> None:
    @app.command()
    def keygen(
        path: Annotated[Path, typer.Argument(help="Where to write the private key (PEM).")],
    ) -> None:
        """Create an Ed25519 signing key; prints the public key for RCEGATE_TRUSTED_KEYS."""
        try:
            typer.echo(generate_key(path))
        except FileExistsError:
            typer.echo(f"{path} exists; not overwriting a key", err=True)
            raise typer.Exit(1) from None

    @app.command()
    def sign(
        artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories.")],
        key: Annotated[Path, typer.Option(help="Private key written by `rcegate keygen`.")],
    ) -> None:
        """Write manifest.json.sig (Ed25519 over manifest.json) in each artifact directory."""
        private = load_private_key(key)
        for directory in artifacts:
            try:
                typer.echo(str(sign_artifact(directory, private)))
            except (SigningError, OSError, ValueError) as exc:
                typer.echo(f"{directory}: {exc}", err=True)
                raise typer.Exit(1) from None

    @app.command("api-key")
    def api_key(
        client_id: Annotated[str, typer.Argument(help="Name of the client the key is for.")],
    ) -> None:
        """Create an API key: prints the key (give it to the client) and the settings entry."""
        key = secrets.token_urlsafe(32)
        digest = hashlib.sha256(key.encode()).hexdigest()
        typer.echo(f"key: {key}")
        typer.echo(f'RCEGATE_API_KEYS entry: "{client_id}": "{digest}"')
