"""OCI images in and out of any driver.

- :func:`import_image` stacks an image (an OCI image layout ``DIR[:TAG]`` or a ``docker save``
  archive) into a driver as a chain of layers, checking every blob's digest and every layer's
  diff id as it is applied, and returns the layer ids bottom to top.
- :func:`export_image` writes a driver's layer chain as an OCI image layout that ``umoci``,
  ``skopeo`` and :func:`import_image` read.
- :func:`open_image` reads an image's manifest and config without applying anything.

See ``docs/images.md`` for the layer ids, the digest checks and how results are compared with
``umoci unpack``.
"""

from graphdrivers.archive.compression import Compression
from graphdrivers.image.digest import Digest, LayerStream, chain_ids
from graphdrivers.image.exporter import export_image, layer_chain
from graphdrivers.image.importer import ProgressCallback, import_image, layer_ids_for
from graphdrivers.image.model import Image, ImageNotFound, LayerBlob, TagNotFound
from graphdrivers.image.source import open_image, parse_reference

__all__ = [
    "Compression",
    "Digest",
    "Image",
    "ImageNotFound",
    "LayerBlob",
    "LayerStream",
    "ProgressCallback",
    "TagNotFound",
    "chain_ids",
    "export_image",
    "import_image",
    "layer_chain",
    "layer_ids_for",
    "open_image",
    "parse_reference",
]
