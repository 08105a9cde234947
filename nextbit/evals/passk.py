"""pass@k, the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With n samples of a problem of which c pass, the chance that at least one of k samples drawn without replacement
passes is

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the (huge) binomials. The benchmark's
pass@k is the mean over problems. For k = 1 it is c / n.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from nextbit.core.errors import NextbitError


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k for one problem with n samples, c of them correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean over problems} for every k, from (n, c) per problem; k must be <= every n."""
    if not counts:
        raise ValueError("no problems to score")
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def parse_ks(text: str, n: int) -> tuple[list[int], list[int]]:
    """--k "1,10,100" -> (the k's that n samples allow, the ones skipped because k > n). Raises on bad input and
    when no k is left."""
    try:
        ks = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        raise NextbitError(f"--k must be comma-separated integers like 1,10,100, got {text!r}")
    if not ks or min(ks) < 1:
        raise NextbitError(f"--k must be comma-separated integers >= 1 like 1,10,100, got {text!r}")
    keep, skip = [k for k in ks if k <= n], [k for k in ks if k > n]
    if not keep:
        raise NextbitError(f"--k {text}: every k is above --n {n} (pass@k needs at least k samples per problem); "
                           f"raise --n to {min(ks)} or more")
    return keep, skip
