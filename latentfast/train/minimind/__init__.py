"""MiniMind's trainer family on the one loop (``python -m latentfast.train.minimind.<stage>`` or
``latentfast-minimind <stage>``). ``common.py`` is the shared flag set, weights and trainer;
each stage module is its defaults, its data and its loss."""
