import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.runtime.packing import pack_rows, packed_row_bytes, unpack_rows


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 7), n=st.integers(1, 67), seed=st.integers(0, 2**16))
def test_round_trip_any_shape(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(n, bits))
    assert torch.equal(unpack_rows(packed, bits, n).long(), codes)


def test_bit_order_is_lsb_first():
    # 4-bit: code 2j in the low nibble; 3-bit codes 1..: stream bits LSB first across bytes.
    assert pack_rows(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack_rows(torch.tensor([[1, 0, 0, 1]]), 1).tolist() == [[0b1001]]
    # 3-bit codes 5 (101) and 6 (110): stream 1,0,1,0,1,1 -> byte 0b110101
    assert pack_rows(torch.tensor([[5, 6]]), 3).tolist() == [[0b110101]]
    # 3 codes of 3 bits spill into a second byte; unused high bits are zero
    assert pack_rows(torch.tensor([[7, 7, 7]]), 3).tolist() == [[0xFF, 0x01]]


def test_rejects_out_of_range_codes_and_bits():
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError, match="need"):
        unpack_rows(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_large_matrices_pack_in_row_chunks_to_the_same_bytes(bits, monkeypatch):
    from lowbit.runtime import packing

    codes = torch.randint(0, 1 << bits, (37, 29), dtype=torch.uint8)
    whole = packing.pack_rows(codes, bits)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 29 * 5)  # 5 rows per chunk, the last one partial
    assert torch.equal(packing.pack_rows(codes, bits), whole)
    assert torch.equal(packing.unpack_rows(whole, bits, 29), codes)
