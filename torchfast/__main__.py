import os
import sys

from torchfast.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank of a multi-process job (torchrun). By now the job has left its process group in step
    # with the other ranks and closed its files; exiting without the interpreter's teardown keeps
    # gloo's worker threads from being destroyed while they still hold tensors, which can abort a
    # rank (SIGABRT, "terminate called without an active exception") after a job that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
