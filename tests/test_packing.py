"""Bit-packing of quantization codes: exact sizes, hand-computed bytes, round trips, and a
bit-by-bit reference decoder written from the module docstring alone (the file format)."""

import math

import pytest
import torch

from qat.packed.packing import pack_codes, packed_bytes, unpack_codes

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # keep the rest of the file running where hypothesis is absent
    given = None

ALL_BITS = [1, 2, 3, 4, 5, 6, 7, 8, 1.58]
ODD_K = [1, 3, 7, 13, 129]


def _levels(bits) -> int:
    return 3 if bits == 1.58 else 2**bits


def _random_codes(shape, bits, seed=0, dtype=torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _levels(bits), shape, generator=g).to(dtype)


def _reference_pack_row(codes: list[int], bits) -> list[int]:
    """The docstring's layout, one bit / one digit at a time, in plain Python."""
    if bits == 1.58:
        padded = codes + [0] * (-len(codes) % 5)
        return [sum(c * 3**j for j, c in enumerate(padded[g : g + 5])) for g in range(0, len(padded), 5)]
    out = [0] * -(-len(codes) * bits // 8)
    for i, c in enumerate(codes):
        for t in range(bits):  # bit t of code i is stream bit p = i*b + t
            p = i * bits + t
            out[p // 8] |= ((c >> t) & 1) << (p % 8)
    return out


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, bits, expected",
    [
        (8, 3, 3),  # 24 bits, no padding to 4 bits a code
        (1, 3, 1),
        (9, 1, 2),
        (8, 1, 1),
        (3, 2, 1),
        (5, 2, 2),
        (3, 4, 2),
        (3, 5, 2),
        (4, 6, 3),
        (8, 7, 7),
        (3, 8, 3),
        (5, 1.58, 1),
        (6, 1.58, 2),
        (0, 4, 0),
        (14336, 3, 5376),
    ],
)
def test_packed_bytes_exact(k, bits, expected):
    assert packed_bytes(k, bits) == expected


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("k", ODD_K)
def test_packed_shape_matches_packed_bytes(bits, k):
    packed = pack_codes(_random_codes((2, k), bits), bits)
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert packed.shape == (2, packed_bytes(k, bits))


# --- known byte patterns, computed by hand -----------------------------------------------


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (1, [1, 0, 1, 1, 0, 0, 0, 0], [0b00001101]),
        (1, [1, 0, 0, 0, 0, 0, 0, 0, 1], [0x01, 0x01]),  # 9th code starts byte 2, rest zero
        (2, [1, 2, 3, 0], [0b00_11_10_01]),
        (4, [3, 10], [0xA3]),
        (4, [15], [0x0F]),  # odd K: the high nibble is padding
        (8, [7, 255, 0], [7, 255, 0]),
        # 3 bits, [1,2,3,4,5,6,7,0]; bit strings written msb..lsb:
        #   byte 0 = c2 low 2 bits (11) | c1 (010) | c0 (001)          = 0b11_010_001 = 0xD1
        #   byte 1 = c5 low bit (0) | c4 (101) | c3 (100) | c2 high (0) = 0b0_101_100_0 = 0x58
        #   byte 2 = c7 (000) | c6 (111) | c5 high 2 bits (11)        = 0b000_111_11 = 0x1F
        (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
        # 5 bits, [31, 1]: byte 0 = c1 low 3 bits (001) | c0 (11111) = 0x3F; byte 1 = c1 high 2 (00)
        (5, [31, 1], [0x3F, 0x00]),
        # 6 bits, [1, 63]: byte 0 = c1 low 2 (11) | c0 (000001) = 0xC1; byte 1 = c1 high 4 (1111)
        (6, [1, 63], [0xC1, 0x0F]),
        # 7 bits, [127, 2]: byte 0 = c1 low bit (0) | c0 (1111111) = 0x7F; byte 1 = c1 >> 1 = 1
        (7, [127, 2], [0x7F, 0x01]),
        (1.58, [2, 1, 0, 0, 1], [2 + 3 + 81]),
        (1.58, [2, 2, 2, 2, 2, 1], [242, 1]),  # the largest byte, then a padded group
    ],
)
def test_known_byte_patterns(bits, codes, expected):
    packed = pack_codes(torch.tensor(codes), bits)
    assert packed.tolist() == expected
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


# --- round trips and the reference decoder ----------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("k", ODD_K)
def test_round_trip_with_batch_dims(bits, k):
    codes = _random_codes((2, 3, k), bits, seed=k)
    packed = pack_codes(codes, bits)
    out = unpack_codes(packed, bits, k)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_matches_reference_layout_row_by_row(bits):
    codes = _random_codes((4, 37), bits, seed=1)
    packed = pack_codes(codes, bits)
    for row, prow in zip(codes.tolist(), packed.tolist()):
        assert prow == _reference_pack_row(row, bits)
    # Rows start on byte boundaries: row r sits at r * row_bytes of the flat buffer.
    row_bytes = packed_bytes(37, bits)
    flat = packed.flatten()
    for r in range(4):
        assert torch.equal(flat[r * row_bytes : (r + 1) * row_bytes], pack_codes(codes[r], bits))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_reference_edge_codes(bits):
    """All-max and alternating max/0 rows exercise every bit of every piece."""
    top = _levels(bits) - 1
    for row in ([top] * 23, [top, 0] * 11 + [top]):
        assert pack_codes(torch.tensor(row), bits).tolist() == _reference_pack_row(row, bits)
        assert unpack_codes(pack_codes(torch.tensor(row), bits), bits, 23).tolist() == row


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_and_non_contiguous_input(dtype):
    codes = _random_codes((16, 10), 3, seed=2, dtype=dtype)
    expected = pack_codes(codes.long(), 3)
    assert torch.equal(pack_codes(codes, 3), expected)
    # A transposed view packs its own (strided) rows.
    t = codes.T
    assert torch.equal(unpack_codes(pack_codes(t, 3), 3, 16).long(), t.long())


def test_empty_rows_and_batches():
    assert pack_codes(torch.zeros(3, 0, dtype=torch.long), 4).shape == (3, 0)
    assert unpack_codes(torch.zeros(3, 0, dtype=torch.uint8), 4, 0).shape == (3, 0)
    assert pack_codes(torch.zeros(0, 7, dtype=torch.long), 1.58).shape == (0, 2)


if given is not None:

    @settings(max_examples=150, deadline=None)
    @given(
        bits=st.sampled_from(ALL_BITS),
        lead=st.lists(st.integers(0, 3), max_size=2),
        k=st.integers(0, 70),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_round_trip_property(bits, lead, k, seed):
        codes = _random_codes((*lead, k), bits, seed=seed)
        packed = pack_codes(codes, bits)
        assert packed.shape == (*lead, packed_bytes(k, bits))
        assert torch.equal(unpack_codes(packed, bits, k).long(), codes)
        rows = math.prod(lead)  # not reshape(-1, k): ambiguous when k == 0
        for row, prow in zip(codes.reshape(rows, k).tolist(), packed.reshape(rows, packed.shape[-1]).tolist()):
            assert prow == _reference_pack_row(row, bits)

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_round_trip_property():
        pass


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, 16, 1.5, 2.5, -1, True, "4", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits=.* is not allowed; use 1\.\.8 or 1\.58"):
        pack_codes(torch.zeros(4, dtype=torch.long), bits)
    with pytest.raises(ValueError, match="is not allowed"):
        packed_bytes(4, bits)


def test_integral_float_bits_accepted():
    assert packed_bytes(8, 3.0) == 3
    assert torch.equal(pack_codes(torch.tensor([5]), 3.0), pack_codes(torch.tensor([5]), 3))


@pytest.mark.parametrize(
    "bits, bad, allowed",
    [(3, 8, "0..7"), (1, 2, "0..1"), (1.58, 3, "0..2"), (4, -1, "0..15")],
)
def test_codes_out_of_range(bits, bad, allowed):
    codes = torch.tensor([0, bad, 1])
    with pytest.raises(ValueError, match=rf"code {bad} is out of range for bits={bits}; allowed {allowed}"):
        pack_codes(codes, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_non_integer_codes(dtype):
    with pytest.raises(ValueError, match="codes must be an integer tensor"):
        pack_codes(torch.zeros(8, dtype=dtype), 4)


def test_scalar_codes():
    with pytest.raises(ValueError, match="must have shape"):
        pack_codes(torch.tensor(1), 4)


def test_packed_wrong_width():
    packed = pack_codes(torch.zeros(2, 8, dtype=torch.long), 3)  # 3 bytes a row
    with pytest.raises(ValueError, match="packed is 3 bytes a row; 9 codes at bits=3 take exactly 4 bytes"):
        unpack_codes(packed, 3, 9)
    with pytest.raises(ValueError, match="take exactly 2 bytes"):
        unpack_codes(packed, 1.58, 8)


def test_packed_wrong_dtype_and_bad_n_codes():
    with pytest.raises(ValueError, match="packed codes are torch.uint8"):
        unpack_codes(torch.zeros(3, dtype=torch.int32), 3, 8)
    with pytest.raises(ValueError, match="n_codes=-1 is not allowed"):
        unpack_codes(torch.zeros(0, dtype=torch.uint8), 3, -1)


def test_corrupt_ternary_byte():
    with pytest.raises(ValueError, match="packed ternary byte 243 is out of range; allowed 0..242"):
        unpack_codes(torch.tensor([10, 243], dtype=torch.uint8), 1.58, 10)
