"""Tight bit-packing of b-bit codes into uint32 words along the last axis.

d codes of b bits take ceil(d·b/32) words, with no padding between codes: code j occupies
bits [j·b, (j+1)·b) of the little-endian bit stream, so a code may straddle two words
(3-bit: 32 codes fill exactly 3 words, d = 128 packs into 12 words, not 13).

The bit layout repeats every 32 codes (= b words), so both directions reshape the last
axis into blocks of 32 codes and apply the same ≤ 32 static shifts to every block: a few
whole-array mx ops, independent of the number of tokens.
"""

import mlx.core as mx
import numpy as np


def _check_bits(bits: int):
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}.")


def packed_words(d: int, bits: int) -> int:
    """Number of uint32 words holding d codes of `bits` bits: ceil(d·bits/32)."""
    _check_bits(bits)
    return (d * bits + 31) // 32


def _layout(bits: int):
    """For the 32 codes of one block: word index, bit offset inside it, and whether the
    code spills into the next word."""
    start = np.arange(32) * bits
    word, shift = start // 32, start % 32
    return word, shift, shift + bits > 32


def _blocks(x: mx.array, length: int, block: int) -> mx.array:
    """Zero-pad the last axis from `length` to a multiple of `block`, then split it into
    [..., n_blocks, block]."""
    pad = -length % block
    if pad:
        x = mx.concatenate([x, mx.zeros((*x.shape[:-1], pad), dtype=x.dtype)], axis=-1)
    return x.reshape(*x.shape[:-1], -1, block)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Pack codes [..., d] (values < 2^bits) into uint32 [..., ceil(d·bits/32)].

    Bit fields never overlap, so adding the shifted codes of a word is the same as OR-ing
    them (a sum is one reduction instead of a chain of ORs).
    """
    _check_bits(bits)
    d = codes.shape[-1]
    c = _blocks(codes.astype(mx.uint32), d, 32)  # [..., G, 32]
    word, shift, spill = _layout(bits)
    lo = c << mx.array(shift.astype(np.uint32))  # bits past 32 fall off the top
    words = []
    for w in range(bits):
        (j,) = np.nonzero(word == w)
        part = lo[..., int(j[0]) : int(j[-1]) + 1].sum(axis=-1)
        prev = int(j[0]) - 1
        if prev >= 0 and spill[prev]:  # the high bits of the code straddling into w
            part = part + (c[..., prev] >> int(32 - shift[prev]))
        words.append(part)
    packed = mx.stack(words, axis=-1)  # [..., G, bits]
    packed = packed.reshape(*packed.shape[:-2], -1)
    return packed[..., : packed_words(d, bits)]


def _spread(w: mx.array, index: np.ndarray) -> mx.array:
    """w[..., index] for a static index made of runs of equal values, by broadcasting
    slices (a gather is several times slower on the CPU backend)."""
    parts, start = [], 0
    while start < len(index):
        end = start + 1
        while end < len(index) and index[end] == index[start]:
            end += 1
        k = int(index[start])
        parts.append(mx.broadcast_to(w[..., k : k + 1], (*w.shape[:-1], end - start)))
        start = end
    return mx.concatenate(parts, axis=-1)


def unpack_codes(packed: mx.array, bits: int, d: int) -> mx.array:
    """Inverse of `pack_codes`: uint32 [..., ceil(d·bits/32)] -> codes uint32 [..., d]."""
    _check_bits(bits)
    n = packed_words(d, bits)
    if packed.shape[-1] != n:
        raise ValueError(
            f"packed has {packed.shape[-1]} words on its last axis, but {d} codes of "
            f"{bits} bits take {n}: pass the d and bits that were used to pack."
        )
    w = _blocks(packed.astype(mx.uint32), n, bits)  # [..., G, bits]
    word, shift, spill = _layout(bits)
    mask = (1 << bits) - 1
    codes = _spread(w, word) >> mx.array(shift.astype(np.uint32))
    if spill.any():
        # High bits come from the next word, shifted up by 32 - shift. A shift by 32 is
        # undefined, so codes that do not straddle read word 0 and are masked to zero.
        nxt = np.where(spill, word + 1, 0)
        up = np.where(spill, 32 - shift, 0).astype(np.uint32)
        keep = mx.array(np.where(spill, mask, 0).astype(np.uint32))
        codes = codes | ((_spread(w, nxt) << mx.array(up)) & keep)
    codes = (codes & mask).reshape(*w.shape[:-2], -1)
    return codes[..., :d]
