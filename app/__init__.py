"""textgen: a text-generation REST service with a continuous-batching engine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("textgen")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
