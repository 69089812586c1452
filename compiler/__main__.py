"""`python -m compiler {build,verify,inspect} ...` (see compiler/cli.py)."""

import logging
import os
import sys

from compiler.cli import main

code = main()
# Skip the interpreter's teardown, as the services do (swiftd/server.py): after torch.compile, a
# C++ thread of torch's still alive at finalization can end the process with SIGABRT ("terminate
# called without an active exception") instead of the command's exit code, which a release
# pipeline acts on. Everything is written by now; flush what is buffered.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
