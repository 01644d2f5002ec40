//go:build xen

package xen

/*
#cgo LDFLAGS: -lxenstore -lxenguest -lxenctrl
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xenctrl.h>
#include <xenguest.h>
#include <xenstore.h>
#include <xen/sched.h>

// Ask the guest to suspend itself, as xl does: write "suspend" to its
// xenstore control/shutdown node.
static int rx_request_suspend(uint32_t domid) {
	struct xs_handle *h = xs_open(0);
	if (!h)
		return -1;
	char path[64];
	snprintf(path, sizeof(path), "/local/domain/%u/control/shutdown", domid);
	bool ok = xs_write(h, XBT_NULL, path, "suspend", strlen("suspend"));
	int e = errno;
	xs_close(h);
	errno = e;
	return ok ? 0 : -1;
}

// Write a xenstore node (dom0's connection).
static int rx_xs_write(const char *path, const char *val) {
	struct xs_handle *h = xs_open(0);
	if (!h)
		return -1;
	bool ok = xs_write(h, XBT_NULL, path, val, strlen(val));
	int e = errno;
	xs_close(h);
	errno = e;
	return ok ? 0 : -1;
}

// 1 if the domain has shut down for a suspend, 0 if not, 2 if it is
// dying, 16+reason if it shut down for another reason (crash, poweroff,
// reboot), -1 on error.
static int rx_suspended(xc_interface *xch, uint32_t domid) {
	xc_domaininfo_t info;
	int n = xc_domain_getinfolist(xch, domid, 1, &info);
	if (n < 0)
		return -1;
	if (n != 1 || info.domain != domid) {
		errno = ESRCH;
		return -1;
	}
	if (info.flags & XEN_DOMINF_dying)
		return 2;
	if (!(info.flags & XEN_DOMINF_shutdown))
		return 0;
	unsigned reason = (info.flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask;
	return reason == SHUTDOWN_suspend ? 1 : 16 + (int)reason;
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unsafe"

	"go.uber.org/zap"
)

// xsWrite writes a xenstore node as dom0 (for tests standing in for a
// hotplug script).
func xsWrite(path, val string) error {
	p, v := C.CString(path), C.CString(val)
	defer C.free(unsafe.Pointer(p))
	defer C.free(unsafe.Pointer(v))
	if rc, err := C.rx_xs_write(p, v); rc < 0 {
		return errnoErr("xs_write "+path, err)
	}
	return nil
}

// goneWhy says what rx_suspended's rc (2: dying; 16+reason: shut down
// with that reason) means. An HVM or PVH guest that triple-faults reboots
// (Xen's default triple-fault action).
func goneWhy(rc int) string {
	if rc == 2 {
		return "dying"
	}
	switch rc - 16 {
	case C.SHUTDOWN_poweroff:
		return "reason poweroff"
	case C.SHUTDOWN_reboot:
		return "reason reboot: the guest rebooted or triple-faulted"
	case C.SHUTDOWN_crash:
		return "reason crash: the guest crashed"
	case C.SHUTDOWN_watchdog:
		return "reason watchdog"
	default:
		return fmt.Sprintf("reason %d", rc-16)
	}
}

// SuspendCooperative asks the guest to suspend itself (xenstore
// control/shutdown = "suspend", as Xen's Remus does when the guest has no
// suspend event channel) and waits until it has: the guest has quiesced
// its PV frontends and called SCHEDOP_shutdown(SHUTDOWN_suspend). Undo it
// with ResumeFast (or Resume). The domain must not be paused by Pause (it
// could not run its suspend path); Pause may follow. A guest found already
// suspended (a request that timed out earlier and took effect late) is
// not asked again.
func (g *Guest) SuspendCooperative(ctx context.Context) error {
	return g.call(ctx, "suspend", func() error {
		if g.closed {
			return errClosed
		}
		if g.paused {
			return errors.New("paused: a paused guest cannot run its suspend path")
		}
		rc, err := C.rx_suspended(g.x.xch, g.x.domid)
		if rc < 0 {
			return errnoErr("xc_domain_getinfolist", err)
		}
		if rc == 1 {
			g.suspended = true
			return nil
		}
		if rc >= 2 {
			return fmt.Errorf("%w: it has shut down (%s)", ErrGone, goneWhy(int(rc)))
		}
		if rc, err := C.rx_request_suspend(C.uint32_t(g.domid)); rc < 0 {
			return errnoErr("xenstore write control/shutdown", err)
		}
		// From here on the guest may suspend at any time: Resume and
		// Close check and cancel it.
		g.suspended = true
		// Poll: a suspend takes milliseconds; no event tells dom0 except
		// the VIRQ_DOM_EXC that xl's own watcher may consume.
		for sleep := 50 * time.Microsecond; ; {
			rc, err := C.rx_suspended(g.x.xch, g.x.domid)
			if rc < 0 {
				return errnoErr("xc_domain_getinfolist", err)
			}
			if rc == 1 {
				return nil
			}
			if rc >= 2 {
				// Crashed, powered off or rebooting meanwhile: it will
				// not suspend. Fail now, not at the deadline.
				return fmt.Errorf("%w: it shut down instead of suspending (%s)", ErrGone, goneWhy(int(rc)))
			}
			if err := ctx.Err(); err != nil {
				// Withdrawn, as libxl does with a suspend that goes
				// unanswered: a guest that has not read it yet never
				// will. One that has may still suspend: g.suspended
				// stays, and Resume or Close cancels it.
				if werr := xsWrite(shutdownPath(g.domid), ""); werr != nil {
					g.log.Warn("could not withdraw the suspend request", zap.Error(werr))
				}
				return fmt.Errorf("guest did not suspend: %w", err)
			}
			time.Sleep(sleep)
			if sleep < time.Millisecond {
				sleep *= 2
			}
		}
	})
}

// lateSuspendWait is how long Close waits for a guest that took a suspend
// request before it was withdrawn to carry it out (a suspend takes
// milliseconds; under TCG on a busy machine seconds).
const lateSuspendWait = 3 * time.Second

func shutdownPath(domid uint32) string {
	return fmt.Sprintf("/local/domain/%d/control/shutdown", domid)
}

// settleSuspend ends a suspend we asked for, for Close, which leaves no
// one behind to cancel it later: a guest that has suspended is resumed
// (cancelSuspend); a request the guest has not acted on is withdrawn
// (control/shutdown emptied) and, should the guest have read it already,
// its suspend is waited for (lateSuspendWait) and cancelled. Runs under
// sem.
func (g *Guest) settleSuspend() error {
	withdrawn, end := false, time.Time{}
	for {
		rc, err := C.rx_suspended(g.x.xch, g.x.domid)
		switch {
		case rc < 0:
			return errnoErr("xc_domain_getinfolist", err)
		case rc == 1:
			return g.cancelSuspend()
		case rc >= 2:
			return nil // gone: nothing to resume
		}
		if !withdrawn {
			if err := xsWrite(shutdownPath(g.domid), ""); err != nil {
				g.log.Warn("could not withdraw the suspend request", zap.Error(err))
			}
			withdrawn, end = true, time.Now().Add(lateSuspendWait)
		}
		if time.Now().After(end) {
			g.suspended = false
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cancelSuspend resumes a guest that suspended for us (xc_domain_resume
// fast); if it has not suspended (yet), nothing is done and the request
// stays pending: a guest that suspends later is resumed by the next call.
// Runs under sem.
func (g *Guest) cancelSuspend() error {
	rc, err := C.rx_suspended(g.x.xch, g.x.domid)
	if rc < 0 {
		return errnoErr("xc_domain_getinfolist", err)
	}
	if rc == 0 {
		g.log.Warn("a suspend was asked for but the guest has not suspended; it will be cancelled when it does")
		return nil
	}
	if rc >= 2 {
		return fmt.Errorf("%w: it shut down instead of suspending (%s)", ErrGone, goneWhy(int(rc)))
	}
	if err := g.x.resumeFast(); err != nil {
		return err
	}
	g.suspended = false
	return nil
}

// resumeFast cancels a suspend the domain is in (xc_domain_resume with
// fast=1, declared in xenguest.h: its suspend hypercall returns 1 and it
// carries on with its devices connected). The domain must be shut down
// with reason suspend.
func (x *xc) resumeFast() error {
	if rc, err := C.xc_domain_resume(x.xch, x.domid, 1); rc < 0 {
		return errnoErr("xc_domain_resume(fast)", err)
	}
	return nil
}

// ResumeFast cancels the guest's suspend (xc_domain_resume with fast=1:
// the suspend hypercall returns 1, the guest carries on with its devices
// connected). A pause taken with Pause still holds afterwards.
func (g *Guest) ResumeFast(ctx context.Context) error {
	return g.call(ctx, "resume", func() error {
		if g.closed {
			return errClosed
		}
		return g.cancelSuspend()
	})
}
