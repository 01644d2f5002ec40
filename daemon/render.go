package daemon

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"text/tabwriter"
)

// RenderStatus writes st as a human-readable table, one VM per line
// sorted by name, followed by any VM's last error.
func RenderStatus(w io.Writer, st []VMStatus) error {
	if len(st) == 0 {
		_, err := fmt.Fprintln(w, "no VMs")
		return err
	}
	vms := append([]VMStatus(nil), st...)
	sort.SliceStable(vms, func(i, j int) bool { return vms[i].VM < vms[j].VM })

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tROLE\tLINK\tOUTBUF\tEPOCH\tACKED\tPAUSE p50/p99 ms\tDIRTY\tWIRE BYTES\tRATIO\tACK p50 ms")
	for _, s := range vms {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s/%s\t%d\t%s\t%s\t%s\n",
			dash(s.VM), dash(s.Role), dash(s.Link), dash(s.OutBuf),
			s.Epoch, s.AckedEpoch,
			fmtMs(s.PauseMsP50), fmtMs(s.PauseMsP99),
			s.DirtyPagesLast, wireBytes(s), fmtRatio(s.CompressionRatio), fmtMs(s.AckMsP50))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	insecure := false
	for _, s := range vms {
		insecure = insecure || s.Insecure
		var notes []string
		if s.PeerName != "" {
			switch s.Role {
			case RoleBackup, RoleActive:
				notes = append(notes, "replica owned by "+s.PeerName)
			default:
				notes = append(notes, "backup "+s.PeerName)
			}
		}
		if s.Busy != "" {
			notes = append(notes, s.Busy)
		}
		if s.StoppedWhy != "" {
			notes = append(notes, "not running here: "+s.StoppedWhy)
		}
		if s.DiskCopying && s.DiskCopyTotalBytes > 0 {
			notes = append(notes, fmt.Sprintf("copying its disks to the backup: %.1f of %.1f MiB (%d%%)",
				float64(s.DiskCopyDoneBytes)/(1<<20), float64(s.DiskCopyTotalBytes)/(1<<20), s.DiskCopyDoneBytes*100/s.DiskCopyTotalBytes))
		}
		if s.OutputHoldRepairs > 0 {
			notes = append(notes, fmt.Sprintf("output hold undone by another tool %d times and put back: output may have left unheld (see the log)", s.OutputHoldRepairs))
		}
		if s.LinksRefused > 0 {
			notes = append(notes, fmt.Sprintf("%d links refused", s.LinksRefused))
		}
		switch {
		case s.Watchdog == WatchdogStopped:
			notes = append(notes, "guest STOPPED by the watchdog (SIGSTOP): "+s.WatchdogError)
		case s.WatchdogError != "":
			notes = append(notes, "watchdog: "+s.WatchdogError)
		}
		for _, n := range notes {
			if _, err := fmt.Fprintf(w, "%s: %s\n", s.VM, n); err != nil {
				return err
			}
		}
		if s.LastError != "" {
			if _, err := fmt.Fprintf(w, "%s: last error: %s\n", s.VM, s.LastError); err != nil {
				return err
			}
		}
	}
	if insecure {
		if _, err := fmt.Fprintln(w, "WARNING: the replication link is INSECURE (plaintext, unauthenticated: config insecure)"); err != nil {
			return err
		}
	}
	return nil
}

// RenderStatusJSON writes st as indented JSON: {"vms":[...]}.
func RenderStatusJSON(w io.Writer, st []VMStatus) error {
	if st == nil {
		st = []VMStatus{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		VMs []VMStatus `json:"vms"`
	}{st})
}

// HumanBytes formats n with binary units: 512 B, 1.5 KiB, 20.0 MiB.
func HumanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatUint(n, 10) + " B"
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// wireBytes is what crossed the replication link, headers included: sent
// by a primary, received by a backup.
func wireBytes(s VMStatus) string {
	if s.WireBytesReceived > 0 && s.WireBytesSent == 0 {
		return HumanBytes(s.WireBytesReceived) + " in"
	}
	return HumanBytes(s.WireBytesSent) + " out"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func fmtMs(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v < 10:
		return strconv.FormatFloat(v, 'f', 2, 64)
	case v < 100:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
}

func fmtRatio(r float64) string {
	if r <= 0 {
		return "-"
	}
	return strconv.FormatFloat(r, 'f', 2, 64) + "x"
}
