"""Bind a manifest's decision constants to its graph: the ONNX metadata entry `rcegate.binding`.

`export_artifact` stamps every new graph. `restamp` upgrades an existing artifact in place
without retraining: it checks that `model.onnx` still has the manifest's sha256, writes the
manifest's binding into the graph's metadata (nothing else in the graph changes), and records
the new sha256 in the manifest. It is reproducible: the same artifact always gives the same
bytes, and stamping a stamped artifact changes nothing. Needs the `onnx` package, not torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

from models.files import write_bytes
from models.manifest import BINDING_KEY, MANIFEST_FILE, MODEL_FILE, Binding, Manifest, sha256_file


class StampError(Exception):
    """The artifact cannot be stamped (it does not verify, or its graph carries another binding)."""


def stamp_graph(model: onnx.ModelProto, binding: Binding) -> None:
    """Set the graph's `rcegate.binding` metadata entry, keeping every other entry in order."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != BINDING_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (BINDING_KEY, binding.to_json())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def graph_binding(model: onnx.ModelProto) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == BINDING_KEY), None)


def restamp(directory: Path, force: bool = False) -> str:
    """Bind `directory`'s manifest to its graph; return the new sha256 of model.onnx.

    Refuses an artifact whose model.onnx does not have the manifest's sha256, and (unless
    `force`) a graph already bound to other constants: stamping vouches for the manifest.
    """
    manifest = Manifest.load(directory)
    model_path = directory / MODEL_FILE
    if sha256_file(model_path) != manifest.sha256:
        raise StampError(f"{model_path}: sha256 does not match the manifest; refusing to stamp")
    model = onnx.load(str(model_path))
    binding = manifest.binding()
    current = graph_binding(model)
    if current is not None and not force:
        differing = binding.differences(Binding.model_validate_json(current))
        if differing:
            raise StampError(
                f"{model_path} is bound to other values of {', '.join(differing)}; "
                "pass force to rebind it to the manifest"
            )
    stamp_graph(model, binding)
    data = model.SerializeToString()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        write_bytes(model_path, data)
        updated = manifest.model_copy(update={"sha256": digest})
        write_bytes(directory / MANIFEST_FILE, (updated.model_dump_json(indent=2) + "\n").encode())
    return digest
