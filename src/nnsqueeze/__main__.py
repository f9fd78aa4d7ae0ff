"""``python -m nnsqueeze``: the CLI.

Python puts the current directory first on ``sys.path`` for ``-m``; ``nnsqueeze/__init__.py``
(which runpy imports before this file) drops it, so a file in the current directory named like a
dependency is never imported instead of it. Name your own modules by file path
(``--model ./models.py:build``) or put their folder on PYTHONPATH.
"""

from .cli import main

main()
