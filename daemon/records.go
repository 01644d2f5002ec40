package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/xen"
)

// vmRecord is what the daemon keeps in its state directory about a VM
// that runs on this host, so that a restarted daemon finds the guest
// again, re-attaches and resumes its protection instead of killing it
// (issue 8, item 6). One JSON file per VM, replaced atomically.
type vmRecord struct {
	Name    string `json:"name"`
	Backend string `json:"backend"`
	// Role is the VM's role here when the record was written: local,
	// primary or active.
	Role string `json:"role"`
	// QEMU is where the guest's QEMU runs (launched or attached).
	QEMU *qemuRecord `json:"qemu,omitempty"`
	// Xen is the domain a xen VM ran as.
	Xen *xenRecord `json:"xen,omitempty"`
	// Protection is set while the VM is protected from this host.
	Protection *protectionRecord `json:"protection,omitempty"`
	UpdatedAt  time.Time         `json:"updated_at"`
}

type qemuRecord struct {
	Pid    int    `json:"pid"`
	QMP    string `json:"qmp"`
	RAM    string `json:"ram"`
	Serial string `json:"serial,omitempty"`
	// Launched: this daemon launched the QEMU (it is ours to stop on
	// `remusd stop`); false for a QEMU someone else launched.
	Launched bool `json:"launched"`
}

// xenRecord is the Xen domain a record's VM ran as: a restarted daemon
// re-attaches only to that same domain (id), and the vif is where its
// output was held.
type xenRecord struct {
	DomID   uint32 `json:"domid"`
	Vif     string `json:"vif,omitempty"`
	Bridged bool   `json:"bridged,omitempty"`
	// XLStandby: the domain is an activated standby, created by xl from
	// xl_config (libvirt does not know it, even for a libvirt VM).
	XLStandby bool `json:"xl_standby,omitempty"`
	// LibvirtStandby: the domain is an activated standby libvirt made
	// (found through libvirt). An active record with neither flag is an
	// xl-made one (written before standbys could be libvirt's).
	LibvirtStandby bool `json:"libvirt_standby,omitempty"`
}

type protectionRecord struct {
	ID       string `json:"id"`
	Peer     string `json:"peer"`      // the address dialled
	PeerName string `json:"peer_name"` // the backup's identity
	// EpochInterval and MaxInflight as protect chose them.
	EpochInterval Duration `json:"epoch_interval"`
	MaxInflight   int      `json:"max_inflight"`
	// OutBuf and Queue are the output buffer mechanism and NFQUEUE queue
	// number on the VM's tap (a restarted daemon re-opens the same).
	OutBuf string `json:"outbuf,omitempty"`
	Queue  uint16 `json:"queue,omitempty"`
}

// recordStore reads and writes vmRecords under stateDir/vms.
type recordStore struct{ dir string }

func newRecordStore(stateDir string) (*recordStore, error) {
	dir := filepath.Join(stateDir, "vms")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	return &recordStore{dir: dir}, nil
}

func (s *recordStore) path(name string) (string, error) {
	if err := hypervisor.ValidateVMName(name); err != nil {
		return "", err
	}
	return filepath.Join(s.dir, name+".json"), nil
}

// load returns the record of name, or nil if there is none.
func (s *recordStore) load(name string) (*vmRecord, error) {
	p, err := s.path(name)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state record of %s: %w", name, err)
	}
	var r vmRecord
	if err := unmarshalStrict(b, &r); err != nil {
		return nil, fmt.Errorf("state record %s: %w", p, err)
	}
	if r.Name != name {
		return nil, fmt.Errorf("state record %s names VM %q", p, r.Name)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("state record %s: %w", p, err)
	}
	return &r, nil
}

// validate checks what a record may say before anything acts on it.
func (r *vmRecord) validate() error {
	switch r.Role {
	case RoleLocal, RolePrimary, RoleActive:
	default:
		return fmt.Errorf("role %q", r.Role)
	}
	if q := r.QEMU; q != nil {
		// A libvirt-driven guest has no QMP socket of its own (remusd
		// reaches it through libvirtd) and no pid: QMP "" with pid 0.
		libvirtGuest := q.QMP == "" && q.Pid == 0
		if q.Pid < 0 || (!libvirtGuest && !filepath.IsAbs(q.QMP)) || !filepath.IsAbs(q.RAM) || (q.Serial != "" && !filepath.IsAbs(q.Serial)) {
			return fmt.Errorf("qemu pid %d, qmp %q, ram %q, serial %q", q.Pid, q.QMP, q.RAM, q.Serial)
		}
	}
	if x := r.Xen; x != nil {
		if x.DomID == 0 || x.DomID >= 0x7ff0 || (x.Vif != "" && !validIfName(x.Vif)) {
			return fmt.Errorf("xen domid %d, vif %q", x.DomID, x.Vif)
		}
	}
	if (r.Backend == xen.BackendName) != (r.Xen != nil) || (r.Xen != nil && r.QEMU != nil) {
		return fmt.Errorf("backend %q with qemu %v and xen %v", r.Backend, r.QEMU != nil, r.Xen != nil)
	}
	if p := r.Protection; p != nil {
		if p.ID == "" || len(p.ID) > 64 {
			return fmt.Errorf("protection id %q", p.ID)
		}
		if _, _, err := net.SplitHostPort(p.Peer); err != nil {
			return fmt.Errorf("protection peer %q: %w", p.Peer, err)
		}
		if i := p.EpochInterval.D(); i < time.Millisecond || i > 10*time.Second {
			return fmt.Errorf("protection epoch interval %v", i)
		}
		if p.MaxInflight < 1 || p.MaxInflight > 64 {
			return fmt.Errorf("protection max_inflight %d", p.MaxInflight)
		}
		switch p.OutBuf {
		case "", "memory", "none", "plug", "nfqueue":
		default:
			return fmt.Errorf("protection output buffer %q", p.OutBuf)
		}
	}
	return nil
}

// save replaces the record of r.Name (write to a temporary file, fsync,
// rename), so that a crash leaves the old or the new record, never half.
func (s *recordStore) save(r vmRecord) error {
	p, err := s.path(r.Name)
	if err != nil {
		return err
	}
	r.UpdatedAt = time.Now().UTC()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("state record of %s: %w", r.Name, err)
	}
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("state record of %s: %w", r.Name, err)
	}
	_, werr := f.Write(append(b, '\n'))
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("state record of %s: %w", r.Name, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("state record of %s: %w", r.Name, err)
	}
	return nil
}

// remove deletes the record of name (no error if there is none).
func (s *recordStore) remove(name string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("state record of %s: %w", name, err)
	}
	return nil
}

// RecordedGuest is a QEMU guest a daemon's state directory says runs on
// its host (the daemon leaves its guests running when it stops).
type RecordedGuest struct {
	VM   string
	Role string
	Pid  int
	QMP  string
}

// RecordedGuests lists the QEMU guests recorded in a daemon's state
// directory, for operators' tools and test teardown.
func RecordedGuests(stateDir string) ([]RecordedGuest, error) {
	dir := filepath.Join(stateDir, "vms")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	s := &recordStore{dir: dir}
	var out []RecordedGuest
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || e.IsDir() {
			continue
		}
		r, err := s.load(name)
		if err != nil || r == nil || r.QEMU == nil {
			continue
		}
		out = append(out, RecordedGuest{VM: r.Name, Role: r.Role, Pid: r.QEMU.Pid, QMP: r.QEMU.QMP})
	}
	return out, nil
}

// KillRecordedGuests kills (SIGKILL, by PID) the QEMU guests recorded in
// stateDir that still run, checking each PID still is that QEMU. For
// tearing down demos and tests; operators use `remusd stop VM`.
func KillRecordedGuests(stateDir string) error {
	gs, err := RecordedGuests(stateDir)
	if err != nil {
		return err
	}
	var errs []error
	for _, g := range gs {
		if processAlive(g.Pid, g.QMP) != nil {
			continue
		}
		if err := syscall.Kill(g.Pid, syscall.SIGKILL); err != nil {
			errs = append(errs, fmt.Errorf("kill %s (pid %d): %w", g.VM, g.Pid, err))
			continue
		}
		for i := 0; i < 300 && processAlive(g.Pid, g.QMP) == nil && !zombie(g.Pid); i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

func zombie(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "stat"))
	return err != nil || strings.Contains(string(b), ") Z ")
}
