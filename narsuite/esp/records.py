"""The esp role's store kinds: defined in :mod:`narsuite.sadb`, shared with the ike role."""

from narsuite.sadb import *  # noqa: F403
from narsuite.sadb import __all__  # noqa: F401
