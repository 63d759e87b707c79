"""Deprecated location: fault injection lives in `elastictrain.testing.faults`."""

import warnings

from elastictrain.testing.faults import *  # noqa: F401,F403
from elastictrain.testing.faults import __all__  # noqa: F401

warnings.warn("elastictrain.ops.chaos moved to elastictrain.testing.faults", DeprecationWarning, stacklevel=2)
