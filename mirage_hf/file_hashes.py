"""One sha256 over files: what identifies a frozen CLIP (training checkpoints), a base detector (adapters) and the
shipped tiny CLIP (its card)."""

import hashlib
from pathlib import Path


def sha256_of_files(paths, with_names: bool = True) -> str:
    """One sha256 over the names and contents of `paths`, in order; `with_names=False` hashes the contents alone
    (for one file, the digest `sha256sum` prints)."""
    digest = hashlib.sha256()
    for path in paths:
        if with_names:
            digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
