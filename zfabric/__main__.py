"""``python -m zfabric`` runs the ``zfabric`` command (this is also how a Nanny starts workers).

A worker started by a Nanny skips the typer app and its imports (see :mod:`zfabric.process`).
"""

import sys


def _main() -> None:
    argv = sys.argv[1:]
    from zfabric.process import is_nanny_worker_argv

    if is_nanny_worker_argv(argv):
        from zfabric.process import main_from_nanny

        sys.exit(main_from_nanny(argv))
    from zfabric.cli import main

    main()


if __name__ == "__main__":
    _main()
