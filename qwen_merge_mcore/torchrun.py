"""`python -m qwen_merge_mcore.torchrun ...`: torchrun, exiting with the workers' requeue code.

On SIGTERM (preemption, `scancel`, `kill`) torchrun passes the signal to its workers, waits up to
`--shutdown-timeout` seconds for them, and then fails with a traceback and exit 1, even when
every worker saved a checkpoint and exited with 75 (EXIT_INTERRUPTED): a requeue wrapper cannot
tell that from a crash. This runs torchrun itself (same arguments) and, when the signal stopped
workers that all exited with 75, says so in one line and exits 75. A failed worker (which
printed its one-line error) ends it with that worker's exit code and one line naming it instead
of torchrun's traceback. Give `--shutdown-timeout` room for a checkpoint save of the model.
"""

from __future__ import annotations

import sys

from .training.signals import EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api
    from torch.distributed.run import main as torchrun

    exit_codes: list[int] = []

    class Agent(LocalElasticAgent):
        def _shutdown(self, *args, **kwargs) -> None:
            workers = self._pcontext
            super()._shutdown(*args, **kwargs)
            result = workers.wait(0) if workers is not None else None
            if result is not None:
                exit_codes[:] = [f.exitcode for f in result.failures.values()] if result.failures \
                    else [0] * len(result.return_values)

    api.LocalElasticAgent = Agent  # what launch_agent builds the agent from
    try:
        torchrun(argv)
    except ChildFailedError as err:  # each worker printed its own error; torchrun's is a 30-line table
        rank, failure = err.get_first_failure()
        print(f"torchrun: worker {rank} failed first, exit code {failure.exitcode} (its error is above)",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as err:
        if not exit_codes or any(code != EXIT_INTERRUPTED for code in exit_codes):
            raise
        print(f"torchrun: stopped on {err.sigval.name}; all {len(exit_codes)} workers checkpointed and exited with "
              f"{EXIT_INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
