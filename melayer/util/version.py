"""melayer's version, recorded in results (``melayer.__version__``)."""

VERSION = "0.1.0"
