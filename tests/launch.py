"""torchrun for the tests: N local gloo processes of a script, one OpenMP thread each, unbuffered output, and
PYTHONFAULTHANDLER set, so a rank that dies by a signal prints where each of its Python threads was."""
import os
import shutil
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(nproc, args, timeout, retry_exit_abort=False):
    """CompletedProcess of `torchrun --standalone --nproc_per_node nproc *args` run from the project root.
    retry_exit_abort: for an idempotent job, run it once more if it failed by a rank's C++ abort (the gloo
    teardown abort shard.finish_torch_distributed avoids; kept as a guard), with a warning that shows the first
    run's output; any other failure, or a second one, is returned as it is."""
    exe = shutil.which("torchrun")
    cmd = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    run = [*cmd, "--standalone", "--nproc_per_node", str(nproc), *args]
    r = subprocess.run(run, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if r.returncode != 0 and retry_exit_abort and GLOO_EXIT_ABORT in r.stdout + r.stderr:
        warnings.warn(f"torchrun job aborted in C++ ({GLOO_EXIT_ABORT!r}), ran it again; its output ended: "
                      + (r.stdout + r.stderr)[-3000:])
        r = subprocess.run(run, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    return r
