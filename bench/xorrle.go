package bench

import (
	"encoding/binary"
	"errors"
)

// XOR+RLE is the anchor codec, modelled on Xen Remus's checkpoint
// compression (tools/libxc xc_compression.c): the page is XORed word-wise
// with the copy last sent, and the delta is written as alternating runs of
// zero words and literal words. It is a benchmark reference only; nothing
// in remusd speaks it.
//
// Format of one page: a sequence of (uvarint zeroWords, uvarint
// literalWords, literalWords*8 literal delta bytes) covering the page's
// words exactly. A page without a previous copy is sent as one literal run
// of the page itself (delta against zero).

// xorRLEEncode appends the encoding of cur against prev (nil: no previous
// copy) to dst. len(cur) must be a multiple of 8.
func xorRLEEncode(dst, cur, prev []byte) []byte {
	words := len(cur) / 8
	word := func(i int) uint64 {
		w := binary.LittleEndian.Uint64(cur[8*i:])
		if prev != nil {
			w ^= binary.LittleEndian.Uint64(prev[8*i:])
		}
		return w
	}
	i := 0
	for i < words {
		z := i
		for z < words && word(z) == 0 {
			z++
		}
		l := z
		for l < words && word(l) != 0 {
			l++
		}
		dst = binary.AppendUvarint(dst, uint64(z-i))
		dst = binary.AppendUvarint(dst, uint64(l-z))
		for k := z; k < l; k++ {
			dst = binary.LittleEndian.AppendUint64(dst, word(k))
		}
		i = l
	}
	return dst
}

var errXORRLE = errors.New("bench: malformed XOR+RLE page")

// xorRLEDecode decodes one page from src into out (len = page size) using
// prev (nil: zero) as the base, and returns the bytes consumed.
func xorRLEDecode(src, out, prev []byte) (int, error) {
	words := len(out) / 8
	if prev != nil {
		copy(out, prev)
	} else {
		clear(out)
	}
	off, i := 0, 0
	for i < words {
		z, n := binary.Uvarint(src[off:])
		if n <= 0 {
			return 0, errXORRLE
		}
		off += n
		l, n := binary.Uvarint(src[off:])
		if n <= 0 {
			return 0, errXORRLE
		}
		off += n
		if z > uint64(words-i) || l > uint64(words-i)-z || uint64(len(src)-off) < 8*l {
			return 0, errXORRLE
		}
		i += int(z)
		for range l {
			w := binary.LittleEndian.Uint64(out[8*i:]) ^ binary.LittleEndian.Uint64(src[off:])
			binary.LittleEndian.PutUint64(out[8*i:], w)
			off += 8
			i++
		}
		if z == 0 && l == 0 {
			return 0, errXORRLE
		}
	}
	return off, nil
}
