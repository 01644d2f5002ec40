//go:build xen

package xen

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/vmtest"
	"github.com/remusd/remusd/xentest"
)

// TestXenSoak is the lab's stability profile (not in CI): with
// XEN_SOAK=<seconds per guest> it boots Xen under QEMU and runs
// TestDom0Soak there, which starts XEN_SOAK_ROUNDS dirtier guests one
// after the other and checkpoints each (XEN_SOAK_MODE: idle, bare or
// coop) for that long, counting the guests that crashed and where.
// XEN_SOAK_ACCEL sets QEMU's -accel (e.g. tcg,thread=single) and
// XEN_SOAK_XENARGS adds to Xen's command line, to compare.
func TestXenSoak(t *testing.T) {
	if os.Getenv("XEN_SOAK") == "" {
		t.Skip("the lab's stability profile: set XEN_SOAK=<seconds per guest>")
	}
	rounds, _ := strconv.Atoi(os.Getenv("XEN_SOAK_ROUNDS"))
	secs, _ := strconv.Atoi(os.Getenv("XEN_SOAK"))
	var files []vmtest.File
	if os.Getenv("XEN_SOAK_NET") != "" {
		_, rf, err := xentest.NetDomUFiles(context.Background(), "", t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, rf)
	}
	runInDom0(t, "^TestDom0Soak$", xentest.Config{
		Files: files,
		Env: map[string]string{
			"XEN_SOAK": os.Getenv("XEN_SOAK"), "XEN_SOAK_ROUNDS": os.Getenv("XEN_SOAK_ROUNDS"),
			"XEN_SOAK_MODE": os.Getenv("XEN_SOAK_MODE"), "XEN_SOAK_NET": os.Getenv("XEN_SOAK_NET"),
			"XEN_SOAK_XL": os.Getenv("XEN_SOAK_XL"), "XEN_SOAK_LIVE": os.Getenv("XEN_SOAK_LIVE"),
		},
		Accel:   os.Getenv("XEN_SOAK_ACCEL"),
		XenArgs: os.Getenv("XEN_SOAK_XENARGS"),
		Timeout: time.Duration(max(rounds, 1)*(secs+90))*time.Second + 2*time.Minute,
		NoRetry: true,
	})
}

// TestDom0Soak: see TestXenSoak.
func TestDom0Soak(t *testing.T) {
	inDom0(t)
	secs, _ := strconv.Atoi(os.Getenv("XEN_SOAK"))
	if secs <= 0 {
		t.Skip("XEN_SOAK unset")
	}
	rounds, _ := strconv.Atoi(os.Getenv("XEN_SOAK_ROUNDS"))
	rounds = max(rounds, 1)
	mode := os.Getenv("XEN_SOAK_MODE")
	if mode == "" {
		mode = "coop"
	}
	ctx := context.Background()
	net := os.Getenv("XEN_SOAK_NET") != ""
	ramdisk, lines := domURamdisk, `on_reboot = "preserve"`
	if v := os.Getenv("XEN_SOAK_XL"); v != "" {
		lines += "\n" + v
	}
	if net {
		script, err := xentest.SetupNet(ctx, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		ramdisk, lines = domUNetRD, lines+"\n"+xentest.NetVifLine(script)
	}
	crashed, bootCrash := 0, 0
	var totalEpochs int
	for r := 0; r < rounds; r++ {
		name := fmt.Sprintf("soak%d", r)
		// A triple fault reboots an HVM domain: keep it to read its registers.
		domid, _ := createGuestWith(ctx, t, name, "pvh", guestMiB(), "", ramdisk, lines)
		if net {
			attachVif(t, domid)
		}
		t0 := time.Now()
		if err := waitConsoleErr(name, "dirtier: 8192 pages", 150*time.Second); err != nil {
			crashed++
			bootCrash++
			t.Logf("round %d: boot: %v; %s", r, err, crashReport(ctx, domid))
			destroy(name)
			continue
		}
		boot := time.Since(t0)
		var echo *xentest.EchoClient
		if net {
			if _, ok := xentest.WaitPing(xentest.NetGuestIP, 60*time.Second); !ok {
				crashed++
				t.Logf("round %d: no ping; %s", r, crashReport(ctx, domid))
				destroy(name)
				continue
			}
			var err error
			if echo, err = xentest.StartEcho(netEcho); err != nil {
				t.Fatal(err)
			}
		}
		epochs, err := soakRound(ctx, t, domid, name, mode, time.Duration(secs)*time.Second)
		if echo != nil {
			n, _, eerr := echo.State()
			echo.Stop()
			if err == nil && eerr != nil {
				err = fmt.Errorf("echo after %d replies: %w", n, eerr)
			}
		}
		totalEpochs += epochs
		if err != nil {
			crashed++
			t.Logf("round %d: booted in %s, crashed after %d epochs: %v; %s; console:\n%s", r, boot.Round(time.Millisecond), epochs, err, crashReport(ctx, domid), xentest.ConsoleTail(name, 60))
		} else {
			t.Logf("round %d: booted in %s, %d epochs, ok", r, boot.Round(time.Millisecond), epochs)
		}
		destroy(name)
	}
	t.Logf("SOAK mode=%s rounds=%d crashed=%d (during boot %d) epochs=%d", mode, rounds, crashed, bootCrash, totalEpochs)
	if crashed > 0 {
		t.Errorf("%d of %d guests crashed", crashed, rounds)
	}
}

func destroy(name string) {
	_, _ = exec.Command(filepath.Join(xentest.BinDir, "xl"), "destroy", name).CombinedOutput()
}

// soakRound runs one guest for d: idle (only watched), or checkpointed
// every 200 ms by a bare pause or a cooperative suspend.
func soakRound(ctx context.Context, t *testing.T, domid uint32, name, mode string, d time.Duration) (int, error) {
	end := time.Now().Add(d)
	alive := func() error {
		st, err := DomainState(ctx, domid)
		if err != nil {
			return err
		}
		if st.Shutdown && !st.Suspended {
			return fmt.Errorf("domain shut down, reason %d", st.ShutdownReason)
		}
		return nil
	}
	if mode == "idle" {
		for time.Now().Before(end) {
			if err := alive(); err != nil {
				return 0, err
			}
			time.Sleep(200 * time.Millisecond)
		}
		return 0, nil
	}
	g, err := Open(ctx, domid, Options{Name: name, Logger: zaptest.NewLogger(t), Cooperative: mode == "coop"})
	if err != nil {
		return 0, err
	}
	defer g.Close()
	bm := dirtymap.New(g.NumPages())
	staging := make([]byte, g.Mapped().Count()*pageSize)
	if os.Getenv("XEN_SOAK_LIVE") != "" {
		// What a daemon's live start does: read every page while the
		// guest runs, then take the baseline.
		buf := make([]byte, g.NumPages()*pageSize)
		if err := g.ReadLive(ctx, 0, g.NumPages(), buf); err != nil {
			return 0, err
		}
		if _, err := g.Rebaseline(ctx); err != nil {
			return 0, err
		}
	}
	var state []byte
	e := 0
	for time.Now().Before(end) {
		time.Sleep(200 * time.Millisecond)
		ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := func() error {
			if err := g.Pause(ectx); err != nil {
				return err
			}
			bm.Reset()
			if err := g.HarvestDirty(ectx, bm); err != nil {
				return err
			}
			if _, err := g.CopyDirty(bm, staging); err != nil {
				return err
			}
			var err error
			if state, err = g.SaveDeviceState(ectx, state[:0]); err != nil {
				return err
			}
			return g.Resume(ectx)
		}()
		cancel()
		if err != nil {
			return e, err
		}
		e++
		if err := alive(); err != nil {
			return e, err
		}
	}
	return e, nil
}

// crashReport reads a crashed domain's (on_crash=preserve) vCPU 0
// registers from its HVM context.
func crashReport(ctx context.Context, domid uint32) string {
	x, err := openXC(domid)
	if err != nil {
		return "no context: " + err.Error()
	}
	defer x.close()
	b, err := x.hvmContext()
	if err != nil {
		return "no context: " + err.Error()
	}
	for off := 0; off+8 <= len(b); {
		code := binary.LittleEndian.Uint16(b[off:])
		n := int(binary.LittleEndian.Uint32(b[off+4:]))
		body := b[off+8:]
		if n > len(body) {
			break
		}
		if code == 2 && n >= 700 { // HVM_SAVE_CODE(CPU): struct hvm_hw_cpu
			q := func(i int) uint64 { return binary.LittleEndian.Uint64(body[512+8*i:]) }
			names := []string{"rax", "rbx", "rcx", "rdx", "rbp", "rsi", "rdi", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4"}
			var s strings.Builder
			for i, nm := range names {
				fmt.Fprintf(&s, "%s=%#x ", nm, q(i))
			}
			return "guest vcpu0: " + s.String()
		}
		if code == 0 && off > 0 {
			break
		}
		off += 8 + n
	}
	return "no cpu record"
}
