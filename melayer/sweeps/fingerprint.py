"""A model's identity for keying sweep cells: the config's content and the weight files' identity.

Computed without loading (or converting) the model: a hash of ``config.json`` and, per weight file, its name,
size and modification time (nanoseconds). Replacing the weights at the same path gives a new fingerprint (so
cells are redone, never mixed); the same model given by a relative or an absolute path gives the same one.
Hashing the contents of multi-GB weight files would take minutes per model; a copy to another disk changes
the modification time and therefore the fingerprint, which errs on the side of recomputing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from melayer.util.errors import MelayerError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _file(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(spec: str) -> dict[str, Any]:
    """``{"kind": ..., "digest": ...}`` plus what the digest was computed from."""
    from melayer.models.embedded import EMBEDDED

    spec = spec.strip()
    if spec in EMBEDDED:
        _, finder = EMBEDDED[spec]
        files = [_file(finder())]
        kind = "embedded"
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            files, kind = [_file(path)], "file"
        elif path.is_dir():
            config = path / "config.json"
            weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
            if not config.exists() and not weights:
                raise MelayerError(f"{path} holds no model (no config.json and no weight files)")
            files = [_file(p) for p in weights]
            if config.exists():
                files.append({"name": "config.json", "sha256": hashlib.sha256(config.read_bytes()).hexdigest()})
            kind = "directory"
        elif spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
            raise MelayerError(f"no such file or directory: {spec}")
        else:  # a hub id: identified by name (pin a revision by downloading it to a directory)
            files, kind = [{"hub_id": spec}], "hub"
    digest = hashlib.sha256(repr(sorted(map(sorted, (f.items() for f in files)))).encode()).hexdigest()[:16]
    return {"kind": kind, "digest": digest, "files": files}
