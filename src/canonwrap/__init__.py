"""canonwrap."""
from canonwrap._version import __version__

