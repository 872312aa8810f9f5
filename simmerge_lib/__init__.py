"""SimMerge kit: predictive model merging.

One module (or package) per chapter of the course: ``zoo`` for chapter 00, ``features`` 01, ``operators`` /
``recipe`` / ``engine`` 02, ``labels`` 03, ``predictor`` 04, ``planner`` 05, ``bandit`` 06, ``scale`` 07, ``search`` 08.
They sit in layers, and imports point only down (``tests/test_layers.py`` checks every import):

- io: ``paths``, ``checkpoint`` (Hugging Face folders, atomic writes, layer indices, tensor groups), ``course``;
- catalogue: ``profiles`` (every profile table), ``tasks``, ``tokenizer``, ``catalogue`` (the catalogue file, pair
  keys), ``probes``, ``evaluate`` (one-pass scoring), ``zoo``;
- merging: ``kernels``, ``operators`` (the registry and the one candidate type), ``vocab``, ``recipe``,
  ``documents`` (multi-document recipes), ``engine`` (streaming and distributed merging, one driver);
- signals: ``features``, ``labels``;
- selection: ``predictor``, ``planner``, ``bandit``;
- search and scale: ``search``, ``scale``;
- runner and CLI: ``runner``, ``cli``.
"""

from __future__ import annotations

__version__ = "0.1.0"
