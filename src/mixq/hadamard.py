"""Hadamard matrices of many orders, and random orthogonal matrices built from them.

A Hadamard matrix ``H ∈ {±1}^{n×n}`` has ``H Hᵀ = n I``; it exists only for ``n ∈ {1, 2}`` and
multiples of 4.  We build:

* Sylvester: ``H_{2n} = [[H, H], [H, −H]]`` (powers of two);
* Paley I: ``q`` prime, ``q ≡ 3 (mod 4)``, order ``q + 1``: ``H = I + [[0, 1ᵀ], [−1, J]]`` with
  the Jacobsthal matrix ``J_ij = χ(j − i)`` (χ the quadratic character mod q);
* Paley II: ``q`` prime, ``q ≡ 1 (mod 4)``, order ``2(q + 1)``:
  ``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]`` with ``C = [[0, 1ᵀ], [1, J]]``;
* Kronecker products of these.

E.g. ``576 = 36·16`` (Paley II q=17 ⊗ Sylvester 16), ``1536 = 12·128`` (Paley I q=11 ⊗
Sylvester), ``960 = 60·16`` (Paley I q=59); no Hadamard matrix exists for orders such as 6 or 9.
:func:`random_orthogonal_factors` returns the Kronecker factors normalised to be orthonormal,
or — when no construction is found — one Haar-random orthogonal matrix (QR of a seeded
Gaussian, signs fixed by ``diag(R)``).
"""
from __future__ import annotations

from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def sylvester(n: int) -> torch.Tensor:
    """``n × n`` Sylvester Hadamard matrix (``n`` a power of two), float64 ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(n: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order ``n`` (float64 ±1), or ``None`` if neither construction applies."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):
        J = _jacobsthal(q)
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, J
        return torch.eye(n, dtype=torch.float64) + S
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=None)
def hadamard_orders(n: int) -> tuple[int, ...] | None:
    """Orders ``(m₁, …, 2^k)`` whose Hadamard matrices we can build and whose product is ``n``.

    Prefers a power of two times a single Paley order, then two Paley orders; ``None`` if none.
    """
    if n >= 1 and n & (n - 1) == 0:
        return (n,)
    two = 1
    while n % (two * 2) == 0:
        two *= 2
    for p in range(1, two.bit_length()):  # n = 2^(k-p) · m with m = odd part · 2^p
        m = n // (two >> p)
        if m % 4 == 0 and paley(m) is not None:
            return (m, two >> p) if two >> p > 1 else (m,)
    for m1 in range(4, int(n ** 0.5) + 1, 4):
        if n % m1 == 0 and paley(m1) is not None:
            rest = hadamard_orders(n // m1)
            if rest is not None:
                return (m1, *rest)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (float64 ±1, ``H Hᵀ = n I``), or ``None`` if not constructible."""
    orders = hadamard_orders(n)
    if orders is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in orders:
        h = torch.kron(h, sylvester(m) if m & (m - 1) == 0 else paley(m))
    return h


def random_orthogonal_factors(n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, str]:
    """Orthonormal factors and random signs of ``Q = (F₁ ⊗ … ⊗ F_k) diag(signs)`` (float64).

    Randomised Hadamard ``H diag(±1)/√n`` when a Hadamard matrix of order ``n`` is constructible,
    otherwise one Haar-random orthogonal matrix (QR of a seeded Gaussian) and signs of +1.
    Returns ``(factors, signs, kind)`` with ``kind`` ``"hadamard"`` or ``"random"``.
    """
    g = torch.Generator().manual_seed(seed)
    orders = hadamard_orders(n)
    if orders is None:
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        Qm, R = torch.linalg.qr(A)
        Qm = Qm * torch.sign(torch.diagonal(R))[None, :]
        return [Qm], torch.ones(n, dtype=torch.float64), "random"
    factors = [(sylvester(m) if m & (m - 1) == 0 else paley(m)) / m ** 0.5 for m in orders]
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return factors, signs, "hadamard"


def dense(factors: list[torch.Tensor], signs: torch.Tensor) -> torch.Tensor:
    """``(F₁ ⊗ … ⊗ F_k) diag(signs)`` as one float64 matrix."""
    q = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        q = torch.kron(q, f.to(torch.float64))
    return q * signs.to(torch.float64)[None, :]
