"""The errors metacore raises on purpose for bad input from its user, as opposed to bugs.

`metacore train` / `eval` print these as one line, `metacore <command>: error: <message>`,
exit status 2 (argparse's convention), and show a traceback only with --debug or
METACORE_DEBUG=1 (metacore/cli.py). Every class here is a ValueError, so code that catches
ValueError for bad input keeps working.

    UserError          bad settings, options or arguments given by the user
    RunDirError        a run directory that cannot be used as asked (no run to resume, a run
                       that would be overwritten, a file where a directory belongs, ...)
    RunExistsError     a run is already there and --resume was not given (also a
                       FileExistsError)
    RunLockedError     another process holds the run directory's lock (names its PID)
    CheckpointError    (metacore.checkpoint) a checkpoint that is corrupt or not one

and one warning, for harmless input: IgnoredSettingWarning, a setting the chosen method does
not read (make_config warns; the CLI prints `metacore train: warning: ...`).
"""


class UserError(ValueError):
    """Bad input from the user: a setting, an option, a file or a run directory."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked; the message names it."""


class RunExistsError(RunDirError, FileExistsError):
    """A run is already in the directory and --resume was not given."""


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock (fcntl.flock on its lock file)."""


class IgnoredSettingWarning(UserWarning):
    """A setting given to a method that does not read it (harmless, so not an error)."""
