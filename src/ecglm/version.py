"""ecglm's version (semantic versioning; CHANGELOG.md says what each release changed). Standard library
only: every layer reads it from here, and ``ecglm.__version__`` is the same string."""

__version__ = "0.2.0"
