"""The package version, in a module of its own so that every layer can read it without
importing the package's API (attnc/__init__.py).

input:  nothing.
output: `__version__`.
does not: import anything of the package.
"""

__version__ = "0.1.0"
