"""Deprecated location: the toy task lives in `elastictrain.testing.toy`."""

import warnings

from elastictrain.testing.toy import *  # noqa: F401,F403
from elastictrain.testing.toy import __all__  # noqa: F401

warnings.warn("elastictrain.toy moved to elastictrain.testing.toy", DeprecationWarning, stacklevel=2)
