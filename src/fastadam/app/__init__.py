"""The app built on fastadam, kept apart from the library: the ``fastadam`` command
(``cli``; also ``python -m fastadam``) with its subcommands ``demo`` and ``bench``, the
Fashion-MNIST loader they and the examples use (``datasets``, public as
:mod:`fastadam.datasets`), and the timing helpers ``fastadam bench`` shares with the
scripts in benchmarks/ (``timing``).

The library never imports this package; it imports the library like any user would.
"""
