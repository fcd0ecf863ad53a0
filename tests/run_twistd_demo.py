"""Run ``twistd -n narsuite ...`` with the test-only demo role registered.

Usage: python tests/run_twistd_demo.py --config FILE --role demo
It is the real twistd entry point and the real plugin; the only addition is
the demo role, registered the way any role package registers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo_role

from narsuite.roles import default_registry

default_registry().register(demo_role.ROLE)

from twisted.scripts.twistd import run  # noqa: E402

# twistd's own options for a test (e.g. "--logfile=PATH"), before the plugin name
extra = os.environ.get("NARSUITE_TEST_TWISTD_ARGS", "").split()
sys.argv = ["twistd", "-n", "--pidfile=", *extra, "narsuite"] + sys.argv[1:]
run()
