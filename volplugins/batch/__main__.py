"""``python -m volplugins.batch``: the ``poolbatch`` command."""

from volplugins.batch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
