"""What `import mirage_hf` adds to the model classes of the remote-code file: the methods that need the package.

`modeling_mirage.py` ships to the Hub and holds the model only. Building on a CLIP checkpoint (`from_clip`) and the
adapter files (`save_adapter`, `from_adapter`, and `from_pretrained` reading an adapter folder or repo as its base
detector plus the adapter) need the rest of the package, so they are attached here, in one table, to
`MiraGeModel` (`MiraGeForImageClassification` inherits them). Attached rather than mixed in through a
subclass: a subclass would be a second class of the same name, and `save_pretrained` would copy its package module
to the Hub as the remote code. Classes loaded as remote code in a process without `mirage_hf` lack these methods.
"""

from .adapter_files import from_adapter, from_pretrained, save_adapter
from .building import from_clip
from .modeling_mirage import MiraGeModel

PACKAGE_METHODS = {
    "from_clip": classmethod(from_clip),
    "save_adapter": save_adapter,
    "from_adapter": classmethod(from_adapter),
    "from_pretrained": classmethod(from_pretrained),
}


def attach_package_methods(cls=MiraGeModel) -> None:
    """Gives `cls` (and its subclasses) the methods of `PACKAGE_METHODS`; `import mirage_hf` calls it once."""
    for name, method in PACKAGE_METHODS.items():
        setattr(cls, name, method)
