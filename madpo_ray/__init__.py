"""madpo-ray."""

from importlib import metadata

try:
    __version__ = metadata.version("madpo-ray")
except metadata.PackageNotFoundError:  # a source tree on the path, not installed
    __version__ = "0+source"
