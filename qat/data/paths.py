"""Where relative paths in data configs point."""
from __future__ import annotations

import os


def absolute_path(path: str) -> str:
    """Resolve `path` against the directory the program was started from.

    Under Hydra that is the original working directory, not the run directory
    (which differs when `hydra.job.chdir=true`), so `data.path=corpus.txt` and
    the default cache directory mean the same place however the job runs.
    Outside Hydra it is the current directory. `~` is expanded.
    """
    from hydra.utils import to_absolute_path

    return to_absolute_path(os.path.expanduser(str(path)))
