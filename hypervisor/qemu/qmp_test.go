package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const fakeGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian test"}, "capabilities": ["oob"]}}`

// fakeQMP is a QMP server on one connection. handle gets each command and
// writes whatever lines it wants with send (nothing = no answer).
type fakeQMP struct {
	conn net.Conn
	wmu  sync.Mutex
	mu   sync.Mutex
	cmds []string
	done chan struct{}
}

type fakeReq struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func (f *fakeQMP) send(line string) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	fmt.Fprintf(f.conn, "%s\n", line)
}

func (f *fakeQMP) reply(r fakeReq, ret string) {
	f.send(fmt.Sprintf(`{"return": %s, "id": %s}`, ret, r.ID))
}

func (f *fakeQMP) commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.cmds...)
}

// serveFake answers on conn: the greeting, then handle for every command
// (qmp_capabilities is answered unless handle is told otherwise by name).
func serveFake(conn net.Conn, handle func(f *fakeQMP, r fakeReq)) *fakeQMP {
	f := &fakeQMP{conn: conn, done: make(chan struct{})}
	go func() {
		defer close(f.done)
		f.send(fakeGreeting)
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			var r fakeReq
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				f.send(`{"error": {"class": "GenericError", "desc": "bad JSON"}}`)
				continue
			}
			f.mu.Lock()
			f.cmds = append(f.cmds, r.Execute)
			f.mu.Unlock()
			if r.Execute == "qmp_capabilities" {
				f.reply(r, "{}")
				continue
			}
			handle(f, r)
		}
	}()
	return f
}

func dialFake(t *testing.T, handle func(f *fakeQMP, r fakeReq)) (*QMP, *fakeQMP) {
	t.Helper()
	c1, c2 := net.Pipe()
	f := serveFake(c2, handle)
	q, err := NewQMP(context.Background(), c1)
	if err != nil {
		t.Fatalf("NewQMP: %v", err)
	}
	t.Cleanup(func() {
		q.Close()
		c2.Close()
		<-f.done
	})
	return q, f
}

func TestQMPHandshakeAndVersion(t *testing.T) {
	q, f := dialFake(t, func(f *fakeQMP, r fakeReq) {
		if r.Execute == "query-version" {
			f.reply(r, `{"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian test"}`)
		}
	})
	want := Version{Major: 7, Minor: 2, Micro: 22, Package: "Debian test"}
	if q.Greeting() != want {
		t.Fatalf("greeting %+v", q.Greeting())
	}
	v, err := q.Version(context.Background())
	if err != nil || v != want || v.String() != "qemu-7.2.22" {
		t.Fatalf("Version %+v %q, %v", v, v.String(), err)
	}
	if got := f.commands(); len(got) != 2 || got[0] != "qmp_capabilities" {
		t.Fatalf("commands %v: capabilities must come first", got)
	}
}

func TestQMPBadGreeting(t *testing.T) {
	c1, c2 := net.Pipe()
	defer c2.Close()
	go fmt.Fprintf(c2, "hello\n")
	if _, err := NewQMP(context.Background(), c1); err == nil || !strings.Contains(err.Error(), "bad QMP greeting") {
		t.Fatalf("NewQMP: %v", err)
	}
}

func TestQMPNoGreeting(t *testing.T) {
	c1, c2 := net.Pipe()
	defer c2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := NewQMP(ctx, c1); !errors.Is(err, ErrTimeout) {
		t.Fatalf("NewQMP: %v", err)
	}
}

func TestQMPCommandError(t *testing.T) {
	q, _ := dialFake(t, func(f *fakeQMP, r fakeReq) {
		f.send(fmt.Sprintf(`{"error": {"class": "CommandNotFound", "desc": "The command %s has not been found"}, "id": %s}`, r.Execute, r.ID))
	})
	err := q.Execute(context.Background(), "frobnicate", map[string]int{"x": 1}, nil)
	var ce *CommandError
	if !errors.As(err, &ce) || ce.Command != "frobnicate" || ce.Class != "CommandNotFound" || !strings.Contains(ce.Desc, "frobnicate") {
		t.Fatalf("err %v", err)
	}
	if !strings.Contains(err.Error(), "frobnicate") || !strings.Contains(err.Error(), "CommandNotFound") {
		t.Fatalf("message %q", err)
	}
}

// Answers arrive out of order and with events in between: each command
// gets its own answer, every event is delivered in order.
func TestQMPMatchingAndEvents(t *testing.T) {
	var mu sync.Mutex
	var held []fakeReq
	q, _ := dialFake(t, func(f *fakeQMP, r fakeReq) {
		mu.Lock()
		defer mu.Unlock()
		held = append(held, r)
		if len(held) < 3 {
			return
		}
		// Answer the three in reverse order, events interleaved.
		for i := len(held) - 1; i >= 0; i-- {
			f.send(fmt.Sprintf(`{"event": "EV%d", "data": {"i": %d}, "timestamp": {"seconds": 1, "microseconds": 2}}`, i, i))
			f.reply(held[i], fmt.Sprintf(`{"cmd": %q}`, held[i].Execute))
		}
		held = nil
	})
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for _, cmd := range []string{"a", "b", "c"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out struct {
				Cmd string `json:"cmd"`
			}
			if err := q.Execute(context.Background(), cmd, nil, &out); err != nil {
				errs <- err
			} else if out.Cmd != cmd {
				errs <- fmt.Errorf("command %s got the answer of %s", cmd, out.Cmd)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i := 2; i >= 0; i-- {
		select {
		case ev := <-q.Events():
			if ev.Name != fmt.Sprintf("EV%d", i) || string(ev.Data) != fmt.Sprintf(`{"i": %d}`, i) || ev.Timestamp.Seconds != 1 {
				t.Fatalf("event %+v, want EV%d", ev, i)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("event not delivered")
		}
	}
}

func TestQMPEventsBounded(t *testing.T) {
	q, _ := dialFake(t, func(f *fakeQMP, r fakeReq) {
		for i := range eventBuffer + 10 {
			f.send(fmt.Sprintf(`{"event": "E", "data": {"i": %d}, "timestamp": {"seconds": 0, "microseconds": 0}}`, i))
		}
		f.reply(r, "{}")
	})
	if err := q.Execute(context.Background(), "spam", nil, nil); err != nil {
		t.Fatal(err)
	}
	if d := q.DroppedEvents(); d != 10 {
		t.Fatalf("dropped %d events, want 10", d)
	}
	ev := <-q.Events()
	if string(ev.Data) != `{"i": 10}` {
		t.Fatalf("oldest kept event %s, want i=10", ev.Data)
	}
}

func TestQMPTimeout(t *testing.T) {
	q, _ := dialFake(t, func(f *fakeQMP, r fakeReq) {
		if r.Execute == "fast" {
			f.reply(r, `"ok"`)
		} // "hang" is never answered
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := q.Execute(ctx, "hang", nil, nil)
	var te *TimeoutError
	if !errors.As(err, &te) || te.Command != "hang" || !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v", err)
	}
	if !strings.Contains(err.Error(), "QMP command hang timed out after") {
		t.Fatalf("message %q", err)
	}
	// The connection stays usable; a late answer would be ignored.
	var s string
	if err := q.Execute(context.Background(), "fast", nil, &s); err != nil || s != "ok" {
		t.Fatalf("after a timeout: %q, %v", s, err)
	}
}

func TestQMPDefaultTimeout(t *testing.T) {
	if DefaultQMPTimeout <= 0 || DefaultQMPTimeout > time.Minute {
		t.Fatalf("DefaultQMPTimeout %v", DefaultQMPTimeout)
	}
	ctx, cancel := withDefaultTimeout(context.Background())
	defer cancel()
	if _, ok := ctx.Deadline(); !ok {
		t.Fatal("no default deadline")
	}
}

func TestQMPEOF(t *testing.T) {
	started := make(chan struct{})
	q, f := dialFake(t, func(f *fakeQMP, r fakeReq) {
		close(started)
		f.conn.Close() // QEMU dies while the command is in flight
	})
	err := q.Execute(context.Background(), "quit-hard", nil, nil)
	<-started
	if !errors.Is(err, ErrQEMUExited) || !strings.Contains(err.Error(), "QEMU exited") || !strings.Contains(err.Error(), "quit-hard") {
		t.Fatalf("in-flight: %v", err)
	}
	<-f.done
	select {
	case <-q.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed")
	}
	if err := q.Execute(context.Background(), "after", nil, nil); !errors.Is(err, ErrQEMUExited) {
		t.Fatalf("after EOF: %v", err)
	}
	if _, ok := <-q.Events(); ok {
		t.Fatal("events channel open after EOF")
	}
}

// getfd passes a descriptor over a real unix socket with SCM_RIGHTS.
func TestQMPPassFD(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "q.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		uc := c.(*net.UnixConn)
		fmt.Fprintf(uc, "%s\n", fakeGreeting)
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(4))
		var pending []byte
		for {
			n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			if oobn > 0 {
				msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
				for _, m := range msgs {
					fds, _ := unix.ParseUnixRights(&m)
					for _, fd := range fds {
						f := os.NewFile(uintptr(fd), "passed")
						b := make([]byte, 16)
						k, _ := f.ReadAt(b, 0)
						f.Close()
						got <- string(b[:k])
					}
				}
			}
			pending = append(pending, buf[:n]...)
			for {
				i := strings.IndexByte(string(pending), '\n')
				if i < 0 {
					break
				}
				var r fakeReq
				_ = json.Unmarshal(pending[:i], &r)
				pending = pending[i+1:]
				fmt.Fprintf(uc, `{"return": {}, "id": %s}`+"\n", r.ID)
			}
		}
	}()
	q, err := DialQMP(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	f, err := os.CreateTemp(dir, "fd")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("hello fd")
	if err := q.ExecuteWithFD(context.Background(), "getfd", map[string]string{"fdname": "x"}, nil, int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-got:
		if s != "hello fd" {
			t.Fatalf("passed fd reads %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no fd received")
	}
}

func TestDialQMPMissingSocket(t *testing.T) {
	_, err := DialQMP(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || !strings.Contains(err.Error(), "none.sock") {
		t.Fatalf("err %v", err)
	}
}

func TestSpecValidate(t *testing.T) {
	good := Spec{Name: "vm", MemoryMiB: 64, RAMPath: "/dev/shm/ram", QMPPath: "/run/q.sock"}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for field, mutate := range map[string]func(*Spec){
		"Name":         func(s *Spec) { s.Name = "" },
		"MemoryMiB":    func(s *Spec) { s.MemoryMiB = 0 },
		"CPUs":         func(s *Spec) { s.CPUs = -1 },
		"Kernel":       func(s *Spec) { s.Initrd = "/boot/initrd" },
		"RAMPath":      func(s *Spec) { s.RAMPath = "ram" },
		"QMPPath":      func(s *Spec) { s.QMPPath = "" },
		"MAC":          func(s *Spec) { s.Tap, s.MAC = "tap0", "zz" },
		"Tap":          func(s *Spec) { s.MAC = "52:54:00:12:34:56" },
		"ExtraArgs[1]": func(s *Spec) { s.ExtraArgs = []string{"-display", "-incoming"} },
		"ExtraArgs[0]": func(s *Spec) { s.ExtraArgs = []string{"--machine", "pc"} },
		"ExtraArgs[2]": func(s *Spec) { s.ExtraArgs = []string{"-rtc", "base=utc", "-smp", "4"} },
		"ExtraArgs[3]": func(s *Spec) { s.ExtraArgs = []string{"-device", "x", "-global", "-readconfig"} },
		"ExtraArgs":    func(s *Spec) { s.ExtraArgs = make([]string, maxExtraArgs+1) },
		"Machine":      func(s *Spec) { s.Machine = "pc-i440fx-7.2" },
		"Accel":        func(s *Spec) { s.Accel = "hvf" },
	} {
		s := good
		mutate(&s)
		err := s.Validate()
		if err == nil || !strings.Contains(err.Error(), "spec "+field+":") {
			t.Errorf("%s: %v", field, err)
		}
	}
	for _, name := range []string{"../x", "a/b", "-rf", "a,b", ".hidden"} {
		s := good
		s.Name = name
		if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "spec Name:") {
			t.Errorf("name %q: %v", name, err)
		}
	}
	s := good
	s.Machine, s.Accel = "pc-q35-7.2", "kvm"
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if args := strings.Join(s.Args(false), " "); !strings.Contains(args, "-accel kvm -machine pc-q35-7.2,memory-backend=ram0") {
		t.Errorf("args %q: machine/accel not used", args)
	}
	s = good
	s.Tap, s.MAC = "tap0", "52:54:00:12:34:56"
	args := strings.Join(s.Args(true), " ")
	for _, want := range []string{
		"-accel tcg", "-machine q35,memory-backend=ram0", "-m 64M",
		"memory-backend-file,id=ram0,size=64M,mem-path=/dev/shm/ram,share=on",
		"-netdev tap,id=n0,ifname=tap0,script=no,downscript=no", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
		"-incoming defer -global migration.send-configuration=off",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("args %q lack %q", args, want)
		}
	}
	c, err := ParseConfig(s.Config())
	if err != nil || c.MAC != s.MAC || c.Tap != "" || c.MemoryMiB != 64 {
		t.Fatalf("config round trip %+v, %v", c, err)
	}
}

func TestCheckDeviceState(t *testing.T) {
	ok := []byte{'Q', 'E', 'V', 'M', 0, 0, 0, 3, 1, 2}
	if err := checkDeviceState(ok); err != nil {
		t.Fatal(err)
	}
	for _, b := range [][]byte{nil, ok[:7], []byte("QEVX\x00\x00\x00\x03"), []byte("QEVM\x00\x00\x00\x02")} {
		if checkDeviceState(b) == nil {
			t.Errorf("%q accepted", b)
		}
	}
}
