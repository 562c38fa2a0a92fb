"""``python -m melayer``: the same entry point as the ``melayer`` console script."""

from melayer.cli import main

if __name__ == "__main__":
    main()
