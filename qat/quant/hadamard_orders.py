"""Which Hadamard orders we can construct, and their dense +-1 matrices.

Real models have reduction dims that are not powers of two (SmolLM2 576 and 1536, Llama-2-7B
11008, Llama-3-8B 14336). We rotate a block of order n = m * p, p a power of two, by
H_n = H_m ⊗ H_p: a dense m x m matmul and the fast butterfly along p (hadamard.py). This file
says which m exist and builds them; it is plain numpy, built lazily and cached, no torch.

Constructions (H_m H_m^T = m I, entries +-1):
- Sylvester, m = 2^k, natural order: H[i, j] = (-1)^popcount(i & j).
- Paley I, m = q + 1 for a prime power q = 3 (mod 4): H = I + S with the skew conference
  matrix S = [[0, 1^T], [-1, Q]]. Not symmetric: H^-1 = H^T / m, not H / m.
- Paley II, m = 2(q + 1) for a prime power q = 1 (mod 4): C = [[0, 1^T], [1, Q]] is
  symmetric, H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]. Symmetric.
- Kronecker products H_a ⊗ H_b of constructible orders.
Q is the Jacobsthal matrix of GF(q): Q[i, j] = chi(e_i - e_j), chi the quadratic character
(0 at 0, 1 on nonzero squares, -1 otherwise) and e_i the field element with index i.

The choice is fixed, because a packed model stores its weights in the rotated basis (its
reader must rebuild the same H; qat/packed/format.py points here): for an order m that is
not a power of two, Paley II if it applies (symmetric), else Paley I, else H_a ⊗ H_b with
the smallest a >= 2 for which both a and m / a are constructible. GF(p^k) is polynomials
over GF(p) modulo the first monic irreducible polynomial of degree k, counting the
candidates x^k + c_{k-1} x^{k-1} + ... + c_0 by the index c_0 + c_1 p + ... + c_{k-1}
p^(k-1); element e_i is the polynomial whose coefficient of x^j is the j-th base-p digit of
i. Orders with no construction here (92, 156, 172, ... need Williamson-type constructions)
are errors, not guesses.
"""

from __future__ import annotations

import functools

import numpy as np

Construction = tuple  # ("sylvester",) | ("paley1", q) | ("paley2", q) | ("kronecker", a, b)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k >= 1; None when q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, int(q**0.5) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q, k = q // p, k + 1
    return (p, k) if q == 1 else None


# ---- GF(p^k): an element is its index; its base-p digits are the polynomial's coefficients.


def _digits(index: int, p: int, k: int) -> list[int]:
    return [(index // p**j) % p for j in range(k)]


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p), f monic; coefficients lowest first."""
    a = list(a)
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top] % p
        if c:
            for j, fj in enumerate(f):
                a[top - len(f) + 1 + j] = (a[top - len(f) + 1 + j] - c * fj) % p
    return [c % p for c in a[: len(f) - 1]]


def _irreducible(f: list[int], p: int) -> bool:
    """No monic factor of degree 1 .. deg(f) / 2 (trial division)."""
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for index in range(p**d):
            if not any(_poly_mod(f, [*_digits(index, p, d), 1], p)):
                return False
    return True


@functools.lru_cache(maxsize=None)
def irreducible_polynomial(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p), coefficients lowest first
    (ending in the leading 1); candidates in the order of c_0 + c_1 p + ... + c_{k-1} p^(k-1)."""
    for index in range(p**k):
        f = [*_digits(index, p, k), 1]
        if _irreducible(f, p):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # one always exists


def field_multiply(a: int, b: int, p: int, k: int) -> int:
    """The product of elements a and b of GF(p^k), by index."""
    da, db = _digits(a, p, k), _digits(b, p, k)
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(da):
        for j, y in enumerate(db):
            prod[i + j] += x * y
    reduced = _poly_mod(prod, list(irreducible_polynomial(p, k)), p) if k > 1 else [prod[0] % p]
    return sum(c * p**j for j, c in enumerate(reduced))


@functools.lru_cache(maxsize=16)
def quadratic_character(q: int) -> np.ndarray:
    """chi(e_i) for every element index i of GF(q): 0, 1 (a nonzero square) or -1 (int64 [q])."""
    p, k = prime_power(q)
    chi = -np.ones(q, dtype=np.int64)
    chi[[field_multiply(a, a, p, k) for a in range(1, q)]] = 1
    chi[0] = 0
    assert (chi == 1).sum() == (q - 1) // 2  # half the nonzero elements are squares (q odd)
    chi.setflags(write=False)
    return chi


def jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(e_i - e_j), int64 [q, q]. Subtraction is digit-wise mod p."""
    p, k = prime_power(q)
    digits = np.array([_digits(i, p, k) for i in range(q)], dtype=np.int64)  # [q, k]
    diff = np.zeros((q, q), dtype=np.int64)
    for j in range(k):
        diff += ((digits[:, None, j] - digits[None, :, j]) % p) * p**j
    return quadratic_character(q)[diff]


# ---- The constructions (+-1 as float64, unnormalised).


def sylvester(n: int) -> np.ndarray:
    """H_n in natural (Sylvester) order, n a power of two: H[i, j] = (-1)^popcount(i & j)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _conference_core(q: int, sign: int) -> np.ndarray:
    """[[0, 1^T], [sign * 1, Q]]: skew (sign -1, q = 3 mod 4) or symmetric (sign 1, q = 1 mod 4)."""
    c = np.zeros((q + 1, q + 1))
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, float(sign), jacobsthal(q)
    return c


def paley_i(q: int) -> np.ndarray:
    """Paley I, order q + 1, q a prime power = 3 (mod 4): I + S, S skew-symmetric."""
    if prime_power(q) is None or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime power q = 3 (mod 4), got q={q}")
    return np.eye(q + 1) + _conference_core(q, -1)


def paley_ii(q: int) -> np.ndarray:
    """Paley II, order 2(q + 1), q a prime power = 1 (mod 4): symmetric."""
    if prime_power(q) is None or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime power q = 1 (mod 4), got q={q}")
    one, two = np.array([[1.0, 1.0], [1.0, -1.0]]), np.array([[1.0, -1.0], [-1.0, -1.0]])
    return np.kron(_conference_core(q, 1), one) + np.kron(np.eye(q + 1), two)


# ---- Which orders.


@functools.lru_cache(maxsize=None)
def construction(m: int) -> Construction | None:
    """How H_m is built (the fixed choice, see the module docstring), or None."""
    if m < 1:
        return None
    if is_power_of_two(m):
        return ("sylvester",)
    if m % 4:
        return None  # a Hadamard order above 2 is a multiple of 4
    q = m // 2 - 1
    if q % 4 == 1 and prime_power(q):
        return ("paley2", q)
    if (m - 1) % 4 == 3 and prime_power(m - 1):
        return ("paley1", m - 1)
    for a in range(2, int(m**0.5) + 1):
        if m % a == 0 and construction(a) and construction(m // a):
            return ("kronecker", a, m // a)
    return None


def describe(m: int) -> str:
    """The construction of H_m in words, e.g. 'Paley I (q=343)'."""
    c = construction(m)
    if c is None:
        return f"no construction of order {m}"
    kind = c[0]
    if kind == "sylvester":
        return f"Sylvester ({m})"
    if kind == "kronecker":
        return f"{describe(c[1])} ⊗ {describe(c[2])}"
    return f"{'Paley I' if kind == 'paley1' else 'Paley II'} (q={c[1]})"


@functools.lru_cache(maxsize=32)
def dense_hadamard(m: int) -> np.ndarray:
    """H_m, +-1 float64 [m, m] (unnormalised; read-only, shared by the cache)."""
    c = construction(m)
    if c is None:
        raise ValueError(f"no Hadamard construction of order {m}")
    kind = c[0]
    if kind == "sylvester":
        h = sylvester(m)
    elif kind == "paley1":
        h = paley_i(c[1])
    elif kind == "paley2":
        h = paley_ii(c[1])
    else:
        h = np.kron(dense_hadamard(c[1]), dense_hadamard(c[2]))
    h.setflags(write=False)
    return h


@functools.lru_cache(maxsize=None)
def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two, H_n = H_m ⊗ H_p (H_p Sylvester, applied fast)
    and m the smallest constructible order that does it (m = 1 for a power of two); None when
    no block of order n can be built. The smallest m is the cheapest: the dense factor costs
    m multiply-adds per element, the butterfly log2(p)."""
    if n < 1:
        return None
    p = n & -n  # the largest power of two dividing n
    m = n // p
    while p >= 1:
        if construction(m):
            return m, p
        m, p = m * 2, p // 2
    return None


def has_construction(n: int) -> bool:
    return hadamard_factorization(n) is not None


@functools.lru_cache(maxsize=None)
def largest_constructible_block(n: int) -> int:
    """The largest b >= 2 dividing n with a construction (1 when there is none: n odd)."""
    return next((b for b in range(n, 1, -1) if n % b == 0 and has_construction(b)), 1)


def hadamard_kronecker(n: int) -> np.ndarray:
    """H_n = H_m ⊗ H_p, +-1 float64 [n, n] (unnormalised): the matrix the transform applies."""
    factors = hadamard_factorization(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction of order {n}")
    m, p = factors
    return np.kron(dense_hadamard(m), sylvester(p))
