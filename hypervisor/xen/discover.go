//go:build xen

package xen

/*
#cgo LDFLAGS: -lxenstore -lxenctrl
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xenctrl.h>
#include <xenstore.h>

// Read a xenstore node as dom0 into buf (NUL-terminated, at most cap-1
// bytes). Returns the length, or -1 with errno (ENOENT: no such node).
static int rx_xs_read(const char *path, char *buf, int cap) {
	struct xs_handle *h = xs_open(0);
	if (!h)
		return -1;
	unsigned int len = 0;
	char *v = xs_read(h, XBT_NULL, path, &len);
	int e = errno;
	xs_close(h);
	if (!v) {
		errno = e;
		return -1;
	}
	if ((int)len >= cap)
		len = cap - 1;
	memcpy(buf, v, len);
	buf[len] = 0;
	free(v);
	return (int)len;
}

// List a xenstore directory as dom0: the names, NUL-separated, into buf.
// Returns the number of entries, or -1 with errno.
static int rx_xs_directory(const char *path, char *buf, int cap) {
	struct xs_handle *h = xs_open(0);
	if (!h)
		return -1;
	unsigned int num = 0;
	char **d = xs_directory(h, XBT_NULL, path, &num);
	int e = errno;
	xs_close(h);
	if (!d) {
		errno = e;
		return -1;
	}
	int off = 0;
	for (unsigned int i = 0; i < num; i++) {
		int l = strlen(d[i]);
		if (off + l + 1 > cap) {
			free(d);
			errno = E2BIG;
			return -1;
		}
		memcpy(buf + off, d[i], l + 1);
		off += l + 1;
	}
	free(d);
	return (int)num;
}

// Pause (un=0) or unpause (un=1) a domain through a handle of its own:
// a fence must not wait for a Guest's calls in flight.
static int rx_pause_ref(uint32_t domid, int un) {
	xc_interface *xch = xc_interface_open(NULL, NULL, 0);
	if (!xch)
		return -1;
	int rc = un ? xc_domain_unpause(xch, domid) : xc_domain_pause(xch, domid);
	int e = errno;
	xc_interface_close(xch);
	errno = e;
	return rc;
}

// The facts DomainState reports, and the domain's Xen handle (its UUID,
// 16 bytes); -1 with errno if the domain is unknown (ESRCH).
static int rx_domain_state(uint32_t domid, unsigned int *flags, uint64_t *cpu_time, unsigned char *handle) {
	xc_interface *xch = xc_interface_open(NULL, NULL, 0);
	if (!xch)
		return -1;
	xc_domaininfo_t info;
	int n = xc_domain_getinfolist(xch, domid, 1, &info);
	int e = errno;
	xc_interface_close(xch);
	if (n < 0) {
		errno = e;
		return -1;
	}
	if (n != 1 || info.domain != domid) {
		errno = ESRCH;
		return -1;
	}
	*flags = info.flags;
	*cpu_time = info.cpu_time;
	memcpy(handle, info.handle, 16);
	return 0;
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// DomainID returns the id of the domain named name on this host (`xl
// domid`, under ctx's deadline). name must be a valid domain name.
func DomainID(ctx context.Context, xl, name string) (uint32, error) {
	if !domainNameRE.MatchString(name) {
		return 0, fmt.Errorf("xen: domain name %q: want 1-64 letters, digits, '.', '_' or '-'", name)
	}
	if xl == "" {
		xl = "xl"
	}
	out, err := xlRun(ctx, xl, "domid", name)
	if err != nil {
		// Only xl's own answer proves there is no such domain; a
		// timeout, a missing xl or a restarting xenstored says nothing.
		if ctx.Err() == nil && strings.Contains(out, "maybe this domain does not exist") {
			return 0, fmt.Errorf("%w: %s", ErrNoDomain, lastLine(out))
		}
		return 0, fmt.Errorf("xen: xl domid %s: %w: %s", name, err, lastLine(out))
	}
	id, err := strconv.ParseUint(strings.TrimSpace(out), 10, 32)
	if err != nil || id == 0 || id >= 0x7ff0 {
		return 0, fmt.Errorf("xen: xl domid %s: unexpected answer %q", name, lastLine(out))
	}
	return uint32(id), nil
}

// DomainName returns the name xenstore gives domain domid
// (/local/domain/DOMID/name): a domain found by id is checked to be the
// one of that name.
func DomainName(ctx context.Context, domid uint32) (string, error) {
	var name string
	err := offload(ctx, "domain name", func() error {
		var err error
		name, err = xsRead(fmt.Sprintf("/local/domain/%d/name", domid))
		if errors.Is(err, syscall.ENOENT) {
			return fmt.Errorf("%w: domain %d has no name in xenstore", ErrNoDomain, domid)
		}
		return err
	})
	return name, err
}

// DomainState returns what Xen says about domain domid right now.
func DomainState(ctx context.Context, domid uint32) (DomainStatus, error) {
	st, _, err := domainState(ctx, domid)
	return st, err
}

// DomainHandle returns domain domid's Xen handle (the UUID its toolstack
// gave it): with the domid, what tells a domain from a later one that
// reuses the id.
func DomainHandle(ctx context.Context, domid uint32) ([16]byte, error) {
	_, h, err := domainState(ctx, domid)
	return h, err
}

func domainState(ctx context.Context, domid uint32) (DomainStatus, [16]byte, error) {
	var st DomainStatus
	var h [16]byte
	err := offload(ctx, "domain state", func() error {
		var flags C.uint
		var cpu C.uint64_t
		var ch [16]C.uchar
		if rc, err := C.rx_domain_state(C.uint32_t(domid), &flags, &cpu, &ch[0]); rc < 0 {
			if errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("%w: domain %d: %w", ErrNoDomain, domid, err)
			}
			return errnoErr("xc_domain_getinfolist", err)
		}
		for i := range h {
			h[i] = byte(ch[i])
		}
		f := uint32(flags)
		st = DomainStatus{
			Paused:         f&C.XEN_DOMINF_paused != 0,
			Shutdown:       f&C.XEN_DOMINF_shutdown != 0,
			Dying:          f&C.XEN_DOMINF_dying != 0,
			ShutdownReason: f >> C.XEN_DOMINF_shutdownshift & C.XEN_DOMINF_shutdownmask,
			CPUTimeNs:      uint64(cpu),
		}
		st.Suspended = st.Shutdown && st.ShutdownReason == shutdownSuspend
		return nil
	})
	return st, h, err
}

// Vifs lists domain domid's network interfaces as dom0's xenstore
// describes their backends (/local/domain/0/backend/vif/DOMID/DEVID):
// the interface name in dom0 is the backend's vifname node when the
// domain's configuration set one, else vifDOMID.DEVID, as libxl names
// them. Every name and address is checked before it is returned.
func Vifs(ctx context.Context, domid uint32) ([]Vif, error) {
	var out []Vif
	err := offload(ctx, "list vifs", func() error {
		base := fmt.Sprintf("/local/domain/0/backend/vif/%d", domid)
		ids, err := xsDirectory(base)
		if errors.Is(err, syscall.ENOENT) {
			return nil // no vif
		}
		if err != nil {
			return err
		}
		for _, s := range ids {
			var dev int
			if _, err := fmt.Sscanf(s, "%d", &dev); err != nil || fmt.Sprint(dev) != s || dev < 0 || dev > 1023 {
				return fmt.Errorf("xenstore %s lists device %q", base, s)
			}
			v := Vif{DevID: dev, Name: fmt.Sprintf("vif%d.%d", domid, dev)}
			name, err := xsRead(base + "/" + s + "/vifname")
			switch {
			case err == nil && name != "":
				v.Name = name
			case err != nil && !errors.Is(err, syscall.ENOENT):
				return err
			}
			if !ifNameRE.MatchString(v.Name) {
				return fmt.Errorf("xenstore %s/%s: vif name %q is not a valid interface name", base, s, v.Name)
			}
			mac, err := xsRead(base + "/" + s + "/mac")
			if err != nil && !errors.Is(err, syscall.ENOENT) {
				return err
			}
			if mac != "" && !macRE.MatchString(mac) {
				return fmt.Errorf("xenstore %s/%s: mac %q is not a MAC address", base, s, mac)
			}
			v.MAC = strings.ToLower(mac)
			out = append(out, v)
		}
		return nil
	})
	return out, err
}

// FrontendDevices lists domain domid's devices as its own xenstore area
// lists them (/local/domain/DOMID/device/KIND/DEVID), as "KIND/DEVID":
// every device a toolstack gave it, whichever domain runs the backend.
func FrontendDevices(ctx context.Context, domid uint32) ([]string, error) {
	var out []string
	err := offload(ctx, "list devices", func() error {
		base := fmt.Sprintf("/local/domain/%d/device", domid)
		kinds, err := xsDirectory(base)
		if errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, k := range kinds {
			ids, err := xsDirectory(base + "/" + k)
			if errors.Is(err, syscall.ENOENT) {
				continue
			}
			if err != nil {
				return err
			}
			for _, id := range ids {
				out = append(out, k+"/"+id)
			}
		}
		return nil
	})
	return out, err
}

// Disks lists domain domid's block devices as dom0's xenstore describes
// their backends (vbd, vbd3 and qdisk: blkback, tapdisk, QEMU), as
// "KIND/DEVID".
func Disks(ctx context.Context, domid uint32) ([]string, error) {
	var out []string
	err := offload(ctx, "list disks", func() error {
		for _, kind := range []string{"vbd", "vbd3", "qdisk"} {
			ids, err := xsDirectory(fmt.Sprintf("/local/domain/0/backend/%s/%d", kind, domid))
			if errors.Is(err, syscall.ENOENT) {
				continue
			}
			if err != nil {
				return err
			}
			for _, id := range ids {
				out = append(out, kind+"/"+id)
			}
		}
		return nil
	})
	return out, err
}

func xsRead(path string) (string, error) {
	p := C.CString(path)
	defer C.free(unsafe.Pointer(p))
	buf := make([]byte, 256)
	n, err := C.rx_xs_read(p, (*C.char)(unsafe.Pointer(&buf[0])), C.int(len(buf)))
	if n < 0 {
		return "", errnoErr("xs_read "+path, err)
	}
	return string(buf[:n]), nil
}

func xsDirectory(path string) ([]string, error) {
	p := C.CString(path)
	defer C.free(unsafe.Pointer(p))
	buf := make([]byte, 16<<10)
	n, err := C.rx_xs_directory(p, (*C.char)(unsafe.Pointer(&buf[0])), C.int(len(buf)))
	if n < 0 {
		return nil, errnoErr("xs_directory "+path, err)
	}
	var out []string
	for i, rest := 0, buf; i < int(n); i++ {
		j := strings.IndexByte(string(rest), 0)
		if j < 0 {
			return nil, fmt.Errorf("xs_directory %s: malformed answer", path)
		}
		out = append(out, string(rest[:j]))
		rest = rest[j+1:]
	}
	return out, nil
}

// WaitSuspendable waits until domain domid's guest announces that it can
// suspend itself (xenstore control/feature-suspend = 1, which Linux writes
// once its watch on control/shutdown is set up) and has connected its
// network and block frontends (device/vif/N/state and device/vbd/N/state
// = 4, Connected), or ctx ends, or the domain shuts down. A domain just
// started is not attached to before that: a cooperative Open suspends the
// guest, which a booting one cannot do yet (Linux writes feature-suspend
// before its init runs; a suspend asked for while a frontend module is
// still being loaded, waiting for its device, fails the guest's freezer
// after 20 s and is dropped: seen in the lab), and the early kernel still
// gives memory back to Xen (a mapping taken then fails).
func WaitSuspendable(ctx context.Context, domid uint32) error {
	path := fmt.Sprintf("/local/domain/%d/control/feature-suspend", domid)
	var lastErr error
	pending := ""
	for {
		st, err := DomainState(ctx, domid)
		if err != nil {
			return err
		}
		if st.Dying || st.Shutdown {
			return fmt.Errorf("%w: domain %d shut down (reason %d) while it booted", ErrNoDomain, domid, st.ShutdownReason)
		}
		var v string
		err = offload(ctx, "read "+path, func() error {
			var err error
			v, err = xsRead(path)
			return err
		})
		if err == nil && strings.TrimSpace(v) == "1" {
			err = offload(ctx, "read the frontends' states", func() error {
				var err error
				pending, err = frontendsPending(domid)
				return err
			})
			if err == nil && pending == "" {
				return nil
			}
		}
		if err != nil && !errors.Is(err, syscall.ENOENT) {
			lastErr = err // not merely "not written yet"
		}
		select {
		case <-ctx.Done():
			if pending != "" && lastErr == nil {
				return fmt.Errorf("xen: domain %d's guest can suspend but has not connected %s yet: it is still booting, or lacks that device's driver: %w", domid, pending, ctx.Err())
			}
			if lastErr != nil {
				return fmt.Errorf("xen: domain %d's guest has not announced that it can suspend (%s = 1); reading it failed: %w", domid, path, errors.Join(lastErr, ctx.Err()))
			}
			return fmt.Errorf("xen: domain %d's guest has not announced that it can suspend (%s = 1): it is still booting, or has no PV drivers (a cooperative checkpoint needs them): %w", domid, path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// frontendsPending names the first of domain domid's vif and vbd
// frontends that is not Connected ("" if none), e.g. "vif/0 (state 1)".
func frontendsPending(domid uint32) (string, error) {
	for _, kind := range []string{"vif", "vbd"} {
		dir := fmt.Sprintf("/local/domain/%d/device/%s", domid, kind)
		ids, err := xsDirectory(dir)
		if errors.Is(err, syscall.ENOENT) {
			continue
		}
		if err != nil {
			return "", err
		}
		for _, id := range ids {
			st, err := xsRead(dir + "/" + id + "/state")
			if errors.Is(err, syscall.ENOENT) {
				return kind + "/" + id + " (no state yet)", nil
			}
			if err != nil {
				return "", err
			}
			if st = strings.TrimSpace(st); st != "4" { // XenbusStateConnected
				return fmt.Sprintf("%s/%s (state %.8q)", kind, id, st), nil
			}
		}
	}
	return "", nil
}

// offload runs fn (a libxc or xenstore call that may block) on its own
// goroutine and returns early with ctx's error; fn then finishes in the
// background.
func offload(ctx context.Context, op string, fn func() error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("xen: %s: %w", op, err)
	}
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("xen: %s: %w", op, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("xen: %s: %w", op, ctx.Err())
	}
}

// Tracking reports whether g tracks dirty pages (false for a guest an
// activated Standby returned: protect it again through a new Open).
func (g *Guest) Tracking() bool {
	g.sem <- struct{}{}
	defer func() { <-g.sem }()
	return g.logDirty && !g.closed
}

// Create creates and starts a domain from the xl configuration file
// configPath, named domain (`xl create`), and returns its id.
func Create(ctx context.Context, xl, configPath, domain string) (uint32, error) {
	if !domainNameRE.MatchString(domain) {
		return 0, fmt.Errorf("xen: domain name %q: want 1-64 letters, digits, '.', '_' or '-'", domain)
	}
	if xl == "" {
		xl = "xl"
	}
	if id, err := xlDomid(ctx, xl, domain); err == nil {
		return 0, fmt.Errorf("xen: a domain named %q exists already (domid %d)", domain, id)
	}
	if out, err := xlRun(ctx, xl, "create", configPath, fmt.Sprintf("name=%q", domain)); err != nil {
		return 0, fmt.Errorf("xen: xl create %s: %w: %s", configPath, err, lastLine(out))
	}
	return xlDomid(ctx, xl, domain)
}

// Destroy destroys domain domid (`xl destroy`).
func Destroy(ctx context.Context, xl string, domid uint32) error {
	if xl == "" {
		xl = "xl"
	}
	if out, err := xlRun(ctx, xl, "destroy", fmt.Sprint(domid)); err != nil {
		return fmt.Errorf("xen: xl destroy %d: %w: %s", domid, err, lastLine(out))
	}
	return nil
}

// PauseDomain takes one pause reference on domain domid
// (xc_domain_pause: Xen counts them; the domain runs again only once each
// is dropped), without asking the guest anything.
func PauseDomain(ctx context.Context, domid uint32) error {
	return offload(ctx, "pause", func() error {
		if rc, err := C.rx_pause_ref(C.uint32_t(domid), 0); rc < 0 {
			return errnoErr("xc_domain_pause", err)
		}
		return nil
	})
}

// UnpauseDomain drops one pause reference on domain domid.
func UnpauseDomain(ctx context.Context, domid uint32) error {
	return offload(ctx, "unpause", func() error {
		if rc, err := C.rx_pause_ref(C.uint32_t(domid), 1); rc < 0 {
			return errnoErr("xc_domain_unpause", err)
		}
		return nil
	})
}

// PauseNow pauses the domain at once (xc_domain_pause through a handle of
// its own), without asking the guest to suspend as a cooperative Pause
// does and without waiting for the Guest's calls in flight (a suspend may
// take seconds): for fencing, where a guest must not run on. The pause is
// a reference of its own, which Resume does not drop: UnpauseNow does.
func (g *Guest) PauseNow(ctx context.Context) error {
	return offload(ctx, "fence pause", func() error {
		if rc, err := C.rx_pause_ref(C.uint32_t(g.domid), 0); rc < 0 {
			return errnoErr("xc_domain_pause", err)
		}
		return nil
	})
}

// UnpauseNow drops the pause reference a PauseNow took.
func (g *Guest) UnpauseNow(ctx context.Context) error {
	return offload(ctx, "fence unpause", func() error {
		if rc, err := C.rx_pause_ref(C.uint32_t(g.domid), 1); rc < 0 {
			return errnoErr("xc_domain_unpause", err)
		}
		return nil
	})
}

// Release lets go of the domain as it is: log-dirty off, memory unmapped,
// handles closed, but a suspend or pause this Guest holds is left in
// place (Close would end them): for a daemon that exits leaving a fenced
// or mid-checkpoint domain stopped, for the next daemon to adopt
// (Options.Recover). Release waits for an abandoned libxc call.
func (g *Guest) Release() error {
	g.sem <- struct{}{}
	defer func() { <-g.sem }()
	if g.closed {
		return nil
	}
	g.closed = true
	var err error
	if g.logDirty {
		err = g.x.disableLogDirty()
	}
	g.x.close()
	if err != nil {
		return fmt.Errorf("xen: release domain %d: %w", g.domid, err)
	}
	return nil
}
