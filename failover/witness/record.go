package witness

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/remusd/remusd/transport"
)

// Record is what the witness says about one VM: who holds its active role
// and at which generation.
//
// A key's generations form one chain: every write (Init, Claim, Release)
// sets the generation to the previous one plus one, and the key is never
// deleted by this package, so a generation names one write of the key's
// whole history. That makes it a fencing token: a peer holding an older
// generation than another is stale.
type Record struct {
	// Holder is the host name that runs the VM's active copy (empty when
	// Released).
	Holder string
	// Generation is the fencing token, 1 for the first write.
	Generation uint64
	// Released: the last holder ended the protection on purpose
	// (Release); nobody holds the VM. Generation still counts.
	Released bool
	// Unprotected: the holder claimed this generation to run without its
	// backup (ClaimUnprotected) and may release output no replica holds.
	// A backup may take over from such a record only once an epoch of
	// this generation committed on its side.
	Unprotected bool
	// Revision is the etcd ModRevision at which the key was read or
	// written; 0 means the key is absent. Claim compares it, so a record
	// is only a valid prev as returned by Witness.
	Revision int64
}

// Held reports whether r names a holder: the key exists and is not
// released.
func (r Record) Held() bool { return r.Revision != 0 && !r.Released }

func (r Record) String() string {
	switch {
	case r.Revision == 0:
		return "absent"
	case r.Released:
		return fmt.Sprintf("released at generation %d (revision %d)", r.Generation, r.Revision)
	}
	if r.Unprotected {
		return fmt.Sprintf("held by %s at generation %d, unprotected (revision %d)", r.Holder, r.Generation, r.Revision)
	}
	return fmt.Sprintf("held by %s at generation %d (revision %d)", r.Holder, r.Generation, r.Revision)
}

// recordVersion is the "v" of the stored JSON. Readers refuse any other:
// a format older readers must not act on bumps it; fields added
// compatibly do not (unknown fields are ignored).
const recordVersion = 1

// maxValueSize bounds a stored value; a larger one is refused unread.
const maxValueSize = 1024

// stored is the JSON form of a Record, e.g.
// {"v":1,"holder":"hostA","generation":3}.
type stored struct {
	V          int    `json:"v"`
	Holder     string `json:"holder,omitempty"`
	Generation uint64 `json:"generation"`
	Released   bool   `json:"released,omitempty"`
	// Unprotected is written only by ClaimUnprotected. A reader that
	// ignored it could let a stale backup take over: every reader of
	// version 1 knows it (no remusd release predates it).
	Unprotected bool `json:"unprotected,omitempty"`
}

// encodeRecord is the stored form of r (its Revision is not stored).
func encodeRecord(r Record) []byte {
	b, err := json.Marshal(stored{V: recordVersion, Holder: r.Holder, Generation: r.Generation, Released: r.Released, Unprotected: r.Unprotected})
	if err != nil {
		panic(err) // a struct of strings and numbers always marshals
	}
	return b
}

// decode parses and validates a stored value read at revision rev. Errors
// wrap ErrCorrupt and name the key.
func decode(key string, value []byte, rev int64) (Record, error) {
	bad := func(format string, args ...any) (Record, error) {
		return Record{}, fmt.Errorf("%w: key %s: %s", ErrCorrupt, key, fmt.Sprintf(format, args...))
	}
	if len(value) > maxValueSize {
		return bad("value of %d bytes exceeds %d", len(value), maxValueSize)
	}
	var s struct {
		V           *int    `json:"v"`
		Holder      string  `json:"holder"`
		Generation  *uint64 `json:"generation"`
		Released    bool    `json:"released"`
		Unprotected bool    `json:"unprotected"`
	}
	dec := json.NewDecoder(bytes.NewReader(value))
	if err := dec.Decode(&s); err != nil {
		return bad("not a witness record: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return bad("trailing data after the record")
	}
	switch {
	case s.V == nil:
		return bad("no record version (\"v\")")
	case *s.V != recordVersion:
		return bad("record version %d, this remusd reads version %d", *s.V, recordVersion)
	case s.Generation == nil || *s.Generation == 0:
		return bad("no generation (must be >= 1)")
	case s.Released && s.Holder != "":
		return bad("released record names holder %q", s.Holder)
	case s.Released && s.Unprotected:
		return bad("released record is marked unprotected")
	}
	if !s.Released {
		if err := transport.ValidateHostName(s.Holder); err != nil {
			return bad("holder: %v", err)
		}
	}
	return Record{Holder: s.Holder, Generation: *s.Generation, Released: s.Released, Unprotected: s.Unprotected, Revision: rev}, nil
}
