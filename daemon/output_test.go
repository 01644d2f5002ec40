package daemon

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
)

func outputRecord(epoch uint64, msg string) []byte {
	b := binary.BigEndian.AppendUint64(nil, epoch)
	b = binary.BigEndian.AppendUint32(b, uint32(len(msg)))
	return append(b, msg...)
}

func TestReadOutputStream(t *testing.T) {
	var stream bytes.Buffer
	fmt.Fprintf(&stream, "%s hostA vm1\n", OutputMagic)
	stream.Write(outputRecord(3, "hello"))
	stream.Write(outputRecord(4, ""))
	var got []string
	err := ReadOutputStream(&stream, func(host string, epoch uint64, msg []byte) {
		got = append(got, fmt.Sprintf("%s/%d/%s", host, epoch, msg))
	})
	if err != nil || strings.Join(got, ",") != "hostA/3/hello,hostA/4/" {
		t.Fatalf("got %v, %v", got, err)
	}

	bad := map[string][]byte{
		"bad header": []byte("HELLO a b\n"),
		"oversize":   append([]byte(OutputMagic+" h v\n"), binary.BigEndian.AppendUint32(make([]byte, 8), 2<<20)...),
		"truncated":  append([]byte(OutputMagic+" h v\n"), outputRecord(1, "abcdef")[:15]...),
	}
	for name, b := range bad {
		if err := ReadOutputStream(bytes.NewReader(b), func(string, uint64, []byte) {}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
