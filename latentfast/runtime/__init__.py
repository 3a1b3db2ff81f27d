"""What a run stands on, shared by the trainers and the evaluations: the process group
(``dist``), checkpoints (``checkpoint``), the non-finite guard (``guard``) and per-device
precision and memory (``device``). Imports nothing of latentfast above ``data/``."""
