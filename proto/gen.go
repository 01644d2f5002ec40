// Package remuspb holds the generated wire schema of the replication link.
//
// Regenerate with `go generate ./proto` (needs protoc and protoc-gen-go at
// the version pinned in go.mod); CI checks that the checked-in code is current.
package remuspb

//go:generate protoc --proto_path=. --go_out=. --go_opt=paths=source_relative remus.proto
