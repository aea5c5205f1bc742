"""Warm-up for reward workers, run at import so the forkserver can preload it.

The first LaTeX parse and the first comparisons of each kind import parts of sympy lazily and
build the parser's prediction tables: about a second of work that would otherwise land on the
first items of every new worker. Workers forked from a server that imported this start warm.
"""

from eureka_jax.rewards.accuracy import judge

_SAMPLES = [
    ("\\frac{1}{2}", "0.5"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("[1, 2)", "[1,2]"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("y = 2x + 1", "2x+1=y"),
    ("50\\%", "0.5"),
    ("x^2+1", "(x+1)^2"),
    ("B", "(B)"),
    ("12", "There are 12 apples."),
    ("x^2 + 5x + 6", "(x+2)(x+3)"),
    ("\\frac{3\\pi}{4}", "\\frac{3}{4}\\pi"),
    ("\\frac{\\sqrt{3}}{2}", "\\sin 60^\\circ"),
    ("x \\le 2", "(-\\infty, 2]"),
    ("\\begin{pmatrix}1 & 2\\end{pmatrix}", "\\begin{pmatrix}1 & 2\\end{pmatrix}"),
]


def warm_up() -> None:
    for gold, prediction in _SAMPLES:
        judge(f"<answer>{prediction}</answer>", gold)


warm_up()
