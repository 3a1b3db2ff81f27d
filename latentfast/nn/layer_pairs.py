"""Which student layer is distilled into which teacher layer.

Layers are transformer blocks ``0..L-1``: block ``l``'s output is HF's
``hidden_states[l + 1]`` (index 0 is the embedding output) and its cache is
``past_key_values[l]``. A student block maps to the teacher block at the same
relative depth, so 'last' pairs last with last and 'middle' middle with middle.
"""
from __future__ import annotations

PRESETS = ("middle", "last", "all")


def _student_layers(num_layers: int, spec) -> list[int]:
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "middle":
            return [(num_layers - 1) // 2]
        if s == "last":
            return [num_layers - 1]
        if s == "all":
            return list(range(num_layers))
        try:  # "4,8,-1" as typed on a command line
            spec = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layers must be one of {PRESETS}, an int or a list of ints, got {spec!r}") from None
    if isinstance(spec, int):
        spec = [spec]
    out = []
    for i in spec:
        if not -num_layers <= int(i) < num_layers:
            raise ValueError(f"layer index {i} out of range for a model with {num_layers} layers")
        out.append(int(i) % num_layers)
    if not out:
        raise ValueError("layers selects no layer")
    return out


def layer_pairs(num_student_layers: int, num_teacher_layers: int, spec="all") -> list[tuple[int, int]]:
    """[(student_layer, teacher_layer), ...] for ``spec`` in 'middle' | 'last' | 'all' |
    int | list of ints | "i,j,k" (student block indices, negatives count from the end)."""
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(f"need at least one layer, got {num_student_layers} and {num_teacher_layers}")
    pairs = []
    for s in _student_layers(num_student_layers, spec):
        t = round((s + 1) * num_teacher_layers / num_student_layers) - 1
        pairs.append((s, min(max(t, 0), num_teacher_layers - 1)))
    return pairs
