"""``python -m zfabric`` runs the ``zfabric`` command (this is also how a Nanny starts workers).

A worker started by a Nanny skips the typer app and its imports (see :mod:`zfabric.worker_main`);
each road imports only what it needs (start-up time).
"""

import sys

from zfabric.process import is_nanny_worker_argv


def _main() -> None:
    argv = sys.argv[1:]
    if is_nanny_worker_argv(argv):
        from zfabric.worker_main import main_from_nanny

        sys.exit(main_from_nanny(argv))
    from zfabric.cli import main

    main()


if __name__ == "__main__":
    _main()
