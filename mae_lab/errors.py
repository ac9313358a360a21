"""The one error type of anticipated bad input.

A study file, data, a database URL, a checkpoint, a trials file or an option that cannot be used raises BadInput (or
a subclass: StudyError, DataError, DbError, CheckpointError, RecordsError, ExportError, ReconError, SlurmError,
TrackerError); ``str()`` is one line naming the file and key, or the option. The command line's boundary
(``run.boundary``) prints it and exits 2, with nothing written to the database; any other exception is a bug in
mae-lab and exits 1 with its traceback.
"""


class BadInput(Exception):
    """Input that cannot be used: ``str()`` is one line naming the file and key (or the option); the command exits
    with ``exit_code``."""

    exit_code = 2
