package transport

import (
	"encoding/binary"
	"errors"
)

// Word-level run-length coding of XOR deltas (PAGE_XOR_RLE), the idea of
// Remus's checkpoint compression in a format of our own (64-bit words,
// uvarint run lengths; Xen's used 32-bit words and one-byte run headers,
// see bench/remusref.go). A page whose delta against the backup's copy is
// a few changed words costs a few bytes per word, where lz4 pays for
// literals and match tokens around them.

var errRLE = errors.New("bad XOR+RLE page")

// rleEncode appends the run-length coding of delta (a multiple of 8 bytes)
// to dst. It gives up and returns ok=false once the output would exceed
// limit bytes.
func rleEncode(dst, delta []byte, limit int) ([]byte, bool) {
	start := len(dst)
	words := len(delta) / 8
	i := 0
	for i < words {
		z := i
		for z < words && binary.LittleEndian.Uint64(delta[8*z:]) == 0 {
			z++
		}
		l := z
		for l < words && binary.LittleEndian.Uint64(delta[8*l:]) != 0 {
			l++
		}
		if len(dst)-start+2*binary.MaxVarintLen16+8*(l-z) > limit {
			return dst[:start], false
		}
		dst = binary.AppendUvarint(dst, uint64(z-i))
		dst = binary.AppendUvarint(dst, uint64(l-z))
		dst = append(dst, delta[8*z:8*l]...)
		i = l
	}
	return dst, true
}

// rleApply decodes src onto out, which holds the base copy: literal words
// are XORed into it. src must cover out's words exactly.
func rleApply(src, out []byte) error {
	words := uint64(len(out) / 8)
	var i uint64
	for i < words {
		z, n := binary.Uvarint(src)
		if n <= 0 {
			return errRLE
		}
		src = src[n:]
		l, n := binary.Uvarint(src)
		if n <= 0 {
			return errRLE
		}
		src = src[n:]
		if (z == 0 && l == 0) || z > words-i || l > words-i-z || uint64(len(src)) < 8*l {
			return errRLE
		}
		i += z
		for k := uint64(0); k < l; k++ {
			o := 8 * (i + k)
			binary.LittleEndian.PutUint64(out[o:], binary.LittleEndian.Uint64(out[o:])^binary.LittleEndian.Uint64(src[8*k:]))
		}
		src = src[8*l:]
		i += l
	}
	if len(src) != 0 {
		return errRLE
	}
	return nil
}
