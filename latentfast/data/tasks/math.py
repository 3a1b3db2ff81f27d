"""MATH (Hendrycks) and MATH-500: ``{"problem": str, "solution": str}`` per row, the gold the
last ``\\boxed{...}`` of the solution (``"answer"`` alone is accepted and boxed). A folder is
read as the recipe's ``<root>/<split>/<subject>/*.json``; MATH-500's ``test.jsonl`` as is.

The normaliser is the recipe's ``process_math_answer``: the boxed answer, else the last LaTeX
span (``\\[..\\]``, ``\\(..\\)``, ``$..$``), else the last number; then its ``_strip_string``
(units ``\\text{ ...}``, ``\\left``/``\\right``, degrees, ``\\%``, ``tfrac``/``dfrac``, ``\\frac12`` ->
``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``, ``a/b`` -> ``\\frac{a}{b}``, a short ``x=`` dropped,
spaces removed), ``\\text{..}`` unwrapped, lower-cased.
"""
from __future__ import annotations

import re

from .base import Task


def find_box(text: str) -> str:
    """Content of the last ``boxed{...}`` (braces balanced); ``boxed 5$`` -> ``5``."""
    ans = text.split("boxed")[-1]
    if not ans:
        return ""
    if ans[0] != "{":
        return ans.split("$")[0].strip()
    depth, out = 1, []
    for ch in ans[1:]:
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            break
        out.append(ch)
    return "".join(out)


_LATEX = re.compile(r"(\\\[(?P<display>[\s\S]+?)\\\])|(\\\((?P<inline>[\s\S]+?)\\\))"
                    r"|((?P<dollar>\$\$?)(?P<dcontent>[\s\S]+?)(?P=dollar))")


def find_latex(text: str) -> str:
    """The last ``\\[..\\]`` / ``\\(..\\)`` / ``$..$`` / ``$$..$$`` span's content ("" if none)."""
    spans = list(_LATEX.finditer(text))
    if not spans:
        return ""
    m = spans[-1]
    return (m.group("display") or m.group("inline") or m.group("dcontent")).strip()


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; a malformed one
    (one character after ``\\frac``) leaves the whole string unchanged."""
    head, *parts = s.split("\\frac")
    out = head
    for sub in parts:
        out += "\\frac"
        if not sub or sub[0] == "{":
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b, rest = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + ("{" + b + "}" if b != "{" else b) + rest
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt2`` -> ``\\sqrt{2}``."""
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt" + ("{" + p[0] + "}" + p[1:] if p and p[0] != "{" else p) for p in parts)


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` (two plain integers, written canonically) -> ``\\frac{3}{4}``."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def strip_string(s: str) -> str:
    """The recipe's LaTeX canonicalisation (``_strip_string``), step by step."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", "")):
        s = s.replace(old, new)
    s = s.strip("$").replace("\\$", "")
    if "\\text{ " in s:  # units: "5 \text{ cm}" -> "5 "
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> " 5"
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    return _fix_a_slash_b(_fix_fracs(s))


def process_math_answer(pred: str) -> str:
    """The recipe's MATH normaliser."""
    pred = pred.strip("\n").rstrip(".").rstrip("/").strip(" ")
    if "boxed" in pred:
        pred = find_box(pred)
    elif find_latex(pred):
        pred = find_latex(pred)
    else:
        nums = re.findall(r"-?\d*\.?\d+", pred)
        pred = nums[-1] if nums else ""
    pred = strip_string(pred).rstrip(".").rstrip("/")
    return re.sub(r"\\text\{([^}]*)\}", r"\1", pred).lower()


def boxed_gold(solution: str) -> str:
    """The recipe's gold: the solution's last boxed answer, re-boxed for the normaliser."""
    return "\\boxed{" + find_box(solution).strip() + "}"


def to_row(r: dict) -> dict:
    solution = r["solution"] if "solution" in r else "\\boxed{" + str(r["answer"]) + "}"
    row = {"question": str(r["problem"]), "answer": str(solution)}
    for k in ("subject", "type", "level", "unique_id"):
        if k in r:
            row[k] = r[k]
    return row


TASK = Task("math", doc='rows {"problem": str, "solution": "... \\\\boxed{answer} ..."} (JSONL, or the recipe\'s '
            "<root>/<split>/<subject>/*.json)", to_row=to_row, normalize=process_math_answer, gold=boxed_gold)
