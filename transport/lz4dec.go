package transport

import "errors"

var (
	errLZ4Truncated = errors.New("lz4 block truncated")
	errLZ4Overflow  = errors.New("lz4 block overflows the page")
	errLZ4Offset    = errors.New("lz4 match offset out of range")
)

// lz4Decode decodes an lz4 block into dst and returns the bytes produced.
// Every read and write is bounds-checked. Unlike the pierrec/lz4 decoder it
// expands overlapping matches (short offsets: the long zero runs of XOR
// deltas) by doubling copies instead of byte by byte, which makes sparse
// deltas decode several times faster.
func lz4Decode(src, dst []byte) (int, error) {
	s, d := 0, 0
	for {
		if s >= len(src) {
			return d, errLZ4Truncated
		}
		tok := src[s]
		s++
		lit := int(tok >> 4)
		if lit == 15 {
			for {
				if s >= len(src) {
					return d, errLZ4Truncated
				}
				c := src[s]
				s++
				lit += int(c)
				if lit > len(dst) {
					return d, errLZ4Overflow
				}
				if c != 255 {
					break
				}
			}
		}
		if lit > len(src)-s {
			return d, errLZ4Truncated
		}
		if lit > len(dst)-d {
			return d, errLZ4Overflow
		}
		d += copy(dst[d:], src[s:s+lit])
		s += lit
		if s == len(src) {
			return d, nil // the last sequence has literals only
		}
		if len(src)-s < 2 {
			return d, errLZ4Truncated
		}
		off := int(src[s]) | int(src[s+1])<<8
		s += 2
		if off == 0 || off > d {
			return d, errLZ4Offset
		}
		ml := int(tok & 15)
		if ml == 15 {
			for {
				if s >= len(src) {
					return d, errLZ4Truncated
				}
				c := src[s]
				s++
				ml += int(c)
				if ml > len(dst) {
					return d, errLZ4Overflow
				}
				if c != 255 {
					break
				}
			}
		}
		ml += 4
		if ml > len(dst)-d {
			return d, errLZ4Overflow
		}
		if off >= ml {
			copy(dst[d:d+ml], dst[d-off:d-off+ml])
		} else {
			// Periodic expansion: dst[d+i] = dst[d+i-off]. Copy the period,
			// then ever longer runs of it (done stays a multiple of off).
			start := d - off
			done := 0
			for done < ml {
				done += copy(dst[d+done:d+ml], dst[start:d+done])
			}
		}
		d += ml
	}
}
