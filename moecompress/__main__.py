"""``python -m moecompress ...`` and ``torchrun --nproc-per-node N -m moecompress ...``: the CLI."""

from moecompress.cli.main import main

if __name__ == "__main__":
    main()
