"""`python -m dist_export`: the command line (cli.run), in every process it starts.

Until the command's modules are loaded (cli.main), Ctrl-C ends the process at once with one line on rank 0:
nothing has been written yet, and a KeyboardInterrupt raised inside an import leaves half-loaded modules behind
(numpy's "cannot load module more than once") and a traceback.
"""
import os
import signal

from .runtime.signals import ignore_from_now_on


def _interrupted_while_loading(signum, frame):
    ignore_from_now_on(signal.SIGINT)  # first: a second SIGINT (the launcher's) must not print again
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # a launcher too: no rank started yet
        os.write(2, b"[rank 0] interrupted during start-up; nothing was written\n")
    os._exit(130)


_interrupted_while_loading.loading = True  # cli._interrupt_once replaces it once the modules are loaded
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_loading)
# A rank of `--nproc-per-node` starts with SIGINT blocked (the launcher's mask, inherited through exec), so a
# Ctrl-C while its interpreter starts is held, not fatal; now that a handler exists it is delivered.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

from .cli import run  # noqa: E402

run()
