"""SimMerge kit: predictive model merging.

One module per chapter of the course (``zoo`` for chapter 00, ``features`` for 01, ``operators``/``engine`` for 02,
…), plus shared pieces: ``tasks`` (synthetic tasks and their scorers), ``tokenizer``, ``catalogue`` (the catalogue
file), ``checkpoint`` (reading and writing Hugging Face folders), ``evaluate`` (batched greedy scoring) and ``cli``.
"""

from __future__ import annotations

__version__ = "0.1.0"
