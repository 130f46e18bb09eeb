"""Dense bit-packing of integer quantization codes, row by row, into uint8 tensors.

This is the on-disk layout of the codes in an exported low-bit model file (safetensors,
so everything is a uint8 tensor). It is specified here completely, so that a reader can
decode our files without our code.

Codes and rows
--------------
A code is an integer in [0, n_levels): n_levels = 2**bits for bits = 1..8, and 3 for
ternary (bits = 1.58). A codes tensor has shape [..., K]; its last axis is a row of K codes
(for a weight [N, K], one output channel). Every row is packed on its own and starts on a
byte boundary, so a packed tensor has shape [..., row_bytes] and, stored C-contiguous, row r
of a 2-D [N, K] matrix starts at byte r * row_bytes. row_bytes = packed_bytes(K, bits).
Decoding needs `bits` and K next to the tensor (the file's metadata carries them).

Integer bits b = 1..8: a little-endian bitstream
------------------------------------------------
Number the bits of a row's byte string 0, 1, 2, ...: bit p is bit (p mod 8) of byte
p // 8, where bit 0 is the least significant bit (value 1) and bit 7 the most (value 128).
Code i occupies bit positions [i*b, (i+1)*b), its least significant bit first, i.e.

    code_i = sum_{t=0}^{b-1} 2**t * bit(i*b + t)

    row_bytes = ceil(K * b / 8)

and every bit past K*b in the last byte is 0. Codes cross byte boundaries when b does not
divide 8 (b = 3, 5, 6, 7); there is no padding of b to a power of two, so 3-bit codes take
ceil(3K/8) bytes. For b = 1, 2, 4, 8 the same rule reduces to the familiar "8/b codes per
byte, LSB first": code j of a byte (j = 0 .. 8/b - 1) is (byte >> (j*b)) & (2**b - 1).

    1 bit,  codes [1,0,1,1,0,0,0,0]  -> 0b00001101 = 0x0D
    4 bits, codes [3, 10]            -> 0xA3
    3 bits, codes [1,2,3,4,5,6,7,0]  -> 0xD1 0x58 0x1F  (the 24-bit number 0x1F58D1 = sum
            code_i << 3i, stored least significant byte first)

Ternary (bits = 1.58): base 3, five codes per byte
--------------------------------------------------
Codes are taken in groups of five, c0..c4 = codes 5g .. 5g+4, and group g is byte g:

    byte_g = c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4          (0 .. 242; 243..255 never occur)

    row_bytes = ceil(K / 5)

and a short last group is padded with code 0. Decoding: c_j = (byte // 3**j) % 3.
Example: codes [2,1,0,0,1] -> 2 + 3 + 81 = 86. (5 codes in 8 bits is 1.6 bits a code,
against log2(3) = 1.585; a base-3 byte is the densest layout that keeps rows byte-aligned.)

Implementation note: codes are packed in groups that fill a whole number of bytes (for b
bits, 8/gcd(b, 8) codes make b/gcd(b, 8) bytes), and each byte of a group is the OR of the
shifted pieces of the at most three codes that touch it. All of it is whole-tensor uint8
shift/or ops (at most 14 a group), no Python loop runs over elements, and it runs on any
device the input lives on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TERNARY_BITS = 1.58  # log2(3); the same spelling as the quantizer config
ALLOWED_BITS = "1..8 or 1.58 (ternary)"
_TERNARY_CODES_PER_BYTE = 5  # 3**5 = 243 <= 256 < 3**6


def _parse_bits(bits: int | float) -> int | float:
    """Normalise a bit-width: an int 1..8 stays an int, 1.58 (within 0.005) is ternary."""
    # bool is an int subclass; bits=True is a bug upstream, not 1 bit.
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise ValueError(f"bits={bits!r} is not allowed; use {ALLOWED_BITS}")
    if math.isclose(bits, TERNARY_BITS, abs_tol=5e-3):
        return TERNARY_BITS
    if float(bits).is_integer() and 1 <= bits <= 8:
        return int(bits)
    raise ValueError(f"bits={bits!r} is not allowed; use {ALLOWED_BITS}")


def _n_levels(bits: int | float) -> int:
    return 3 if bits == TERNARY_BITS else 2 ** int(bits)


def packed_bytes(n_codes_per_row: int, bits: int | float) -> int:
    """Bytes one packed row of `n_codes_per_row` codes takes: ceil(K*b/8), or ceil(K/5) ternary."""
    bits = _parse_bits(bits)
    _check_count("n_codes_per_row", n_codes_per_row)
    if bits == TERNARY_BITS:
        return -(-n_codes_per_row // _TERNARY_CODES_PER_BYTE)
    return -(-n_codes_per_row * bits // 8)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed; use an int >= 0")


def _group(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group of b-bit codes: 8/gcd(b,8) codes fill b/gcd(b,8) bytes."""
    g = math.gcd(bits, 8)
    return 8 // g, bits // g


def _pieces(bits: int) -> list[tuple[int, int, int]]:
    """(code i, byte j, s = i*b - 8j) for every code/byte pair of a group that share a bit.

    Bit t of code i is stream bit i*b + t, i.e. bit s + t of byte j. So byte j gets
    code_i << s (s >= 0) or code_i >> -s (s < 0), and code i gets byte_j >> s or
    byte_j << -s; in uint8 the shifts drop exactly the bits that belong elsewhere
    (uint8 << wraps mod 256; a final mask to b bits clears the rest when unpacking).
    """
    n_codes, _ = _group(bits)
    return [
        (i, j, i * bits - 8 * j)
        for i in range(n_codes)
        for j in range(i * bits // 8, (i * bits + bits - 1) // 8 + 1)
    ]


def _shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """x << s, or x >> -s for negative s (torch rejects negative shift counts)."""
    return x << s if s >= 0 else x >> -s


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last axis up to `size`."""
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _check_codes(codes: torch.Tensor, bits: int | float) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes.dtype={codes.dtype} is not allowed; codes must be an integer tensor")
    if codes.dim() == 0:
        raise ValueError("codes is a scalar; it must have shape [..., K]")
    if codes.numel() == 0:
        return
    n = _n_levels(bits)
    # One reduction on the good path; the mask (a full-size temporary) only on failure.
    lo, hi = torch.aminmax(codes)
    if lo.item() < 0 or hi.item() >= n:
        bad = codes[(codes < 0) | (codes >= n)]
        raise ValueError(
            f"code {bad[0].item()} is out of range for bits={bits}; allowed 0..{n - 1} "
            f"({bad.numel()} codes out of range)"
        )


def pack_codes(codes: torch.Tensor, bits: int | float) -> torch.Tensor:
    """Pack integer codes [..., K] in [0, n_levels) into contiguous uint8 [..., packed_bytes(K, bits)].

    Each row (last axis) is packed independently in the layout of the module docstring.
    """
    bits = _parse_bits(bits)
    _check_codes(codes, bits)
    *lead, k = codes.shape
    row_bytes = packed_bytes(k, bits)
    if bits == TERNARY_BITS:
        per = _TERNARY_CODES_PER_BYTE
        groups = -(-k // per)
        c = _pad_last(codes.to(torch.uint8), groups * per).reshape(*lead, groups, per)
        out = torch.zeros((*lead, groups), dtype=torch.uint8, device=codes.device)
        for j in range(per):  # <= 242 throughout, so uint8 arithmetic cannot wrap
            out += c[..., j] * 3**j
        return out
    n_codes, n_bytes = _group(bits)
    groups = -(-k // n_codes)
    # Everything stays uint8 (one byte a code in, one out): no wide temporaries.
    c = _pad_last(codes.to(torch.uint8), groups * n_codes).reshape(*lead, groups, n_codes)
    out = torch.zeros((*lead, groups, n_bytes), dtype=torch.uint8, device=codes.device)
    for i, j, s in _pieces(bits):  # at most 14 pieces (b = 7)
        out[..., j] |= _shift(c[..., i], s)
    out = out.reshape(*lead, groups * n_bytes)
    # The padded group may hold whole bytes past ceil(K*b/8) (only padding bits); drop them.
    return out[..., :row_bytes].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int | float, n_codes: int) -> torch.Tensor:
    """Unpack uint8 [..., packed_bytes(n_codes, bits)] into uint8 codes [..., n_codes].

    The inverse of pack_codes. Codes come back as uint8 (n_levels <= 256 always fits);
    widen them yourself before arithmetic that could overflow.
    """
    bits = _parse_bits(bits)
    _check_count("n_codes", n_codes)
    row_bytes = packed_bytes(n_codes, bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed.dtype={packed.dtype} is not allowed; packed codes are torch.uint8")
    if packed.dim() == 0 or packed.shape[-1] != row_bytes:
        width = "a scalar" if packed.dim() == 0 else f"{packed.shape[-1]} bytes a row"
        raise ValueError(
            f"packed is {width}; {n_codes} codes at bits={bits} take exactly {row_bytes} bytes a row"
        )
    *lead, _ = packed.shape
    if bits == TERNARY_BITS:
        if packed.numel() and packed.max().item() > 242:
            raise ValueError(
                f"packed ternary byte {packed.max().item()} is out of range; allowed 0..242 (3**5 - 1)"
            )
        per = _TERNARY_CODES_PER_BYTE
        digits = [(packed // 3**j) % 3 for j in range(per)]
        out = torch.stack(digits, dim=-1).reshape(*lead, row_bytes * per)
        return out[..., :n_codes].contiguous()
    per_group, n_bytes = _group(bits)
    groups = -(-n_codes // per_group)
    p = _pad_last(packed, groups * n_bytes).reshape(*lead, groups, n_bytes)
    codes = torch.zeros((*lead, groups, per_group), dtype=torch.uint8, device=packed.device)
    for i, j, s in _pieces(bits):
        codes[..., i] |= _shift(p[..., j], -s)
    codes &= 2**bits - 1  # clear the neighbours' bits that came along
    codes = codes.reshape(*lead, groups * per_group)
    return codes[..., :n_codes].contiguous()
