"""Hypothesis keeps its files in a temporary directory, never in the checkout."""

import os
import tempfile

os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "nnsqueeze-hypothesis"))
