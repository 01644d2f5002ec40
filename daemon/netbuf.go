package daemon

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/outbuf"
	"github.com/remusd/remusd/outbuf/nfqueue"
	"github.com/remusd/remusd/outbuf/plug"
)

// Output buffer modes (Config.OutputBuffer).
const (
	OutputAuto       = "auto"        // plug where the kernel has it, else NFQUEUE
	OutputPlug       = "plug"        // sch_plug only
	OutputNFQueue    = "nfqueue"     // NFQUEUE only
	OutputNoneUnsafe = "none-unsafe" // no output commit: clients may see output the backup cannot reproduce
)

// chooseOutputBuffer decides the mechanism for a VM's network interface
// from the operator's mode and what the kernel offers. unsafe is true when
// output will not be held at all (only ever by explicit choice).
func chooseOutputBuffer(mode string, probe outbuf.ProbeResult) (kind string, unsafe bool, err error) {
	switch mode {
	case OutputNoneUnsafe:
		return "none", true, nil
	case OutputAuto, "":
		if probe.Kind == "plug" || probe.Kind == "nfqueue" {
			return probe.Kind, false, nil
		}
		return "", false, fmt.Errorf("no output buffering mechanism on this host (%s): refusing to protect; set output_buffer: %s to protect without output commit (clients may then see output the backup cannot reproduce)", probe.Reason, OutputNoneUnsafe)
	case OutputPlug:
		if probe.Kind != "plug" {
			return "", false, fmt.Errorf("output_buffer is plug but the kernel cannot create a plug qdisc (%s); use auto or nfqueue", probe.Reason)
		}
		return "plug", false, nil
	case OutputNFQueue:
		if probe.Kind == "none" {
			return "", false, fmt.Errorf("output_buffer is nfqueue but NFQUEUE is unavailable (%s)", probe.Reason)
		}
		return "nfqueue", false, nil
	}
	return "", false, fmt.Errorf("output_buffer %q unknown (want %s|%s|%s|%s)", mode, OutputAuto, OutputPlug, OutputNFQueue, OutputNoneUnsafe)
}

// netBufferSpec describes the guest network port to hold output on.
type netBufferSpec struct {
	Interface string // host-side tap/vif of the guest
	Bridged   bool   // the port is a bridge port (NFQUEUE matches physdev)
	QueueNum  uint16 // NFQUEUE queue number for this VM
	// PacketsPerSec is the expected egress rate, to size the queue.
	PacketsPerSec float64
	Epoch, Ack    time.Duration
}

// openNetBuffer opens the chosen mechanism on a guest's interface.
func openNetBuffer(ctx context.Context, kind string, spec netBufferSpec, log *zap.Logger) (outbuf.Buffer, error) {
	switch kind {
	case "plug":
		b, err := plug.New(ctx, plug.Config{Interface: spec.Interface}, log)
		if err != nil {
			return nil, fmt.Errorf("plug output buffer on %s: %w", spec.Interface, err)
		}
		return b, nil
	case "nfqueue":
		qlen, rbuf := nfqueue.SizeFor(max(spec.PacketsPerSec, 10000), spec.Epoch, spec.Ack)
		b, err := nfqueue.New(ctx, nfqueue.Config{QueueNum: spec.QueueNum, Interface: spec.Interface, Bridged: spec.Bridged,
			MaxQueueLen: qlen, ReadBufferBytes: rbuf}, log)
		if err != nil {
			return nil, fmt.Errorf("nfqueue output buffer on %s: %w", spec.Interface, err)
		}
		return b, nil
	case "none":
		log.Warn("protecting WITHOUT output commit (output_buffer none-unsafe): clients may see output the backup cannot reproduce",
			zap.String("interface", spec.Interface))
		m := outbuf.NewMemory(0, nil)
		_ = m.ReleaseAll()
		return m, nil
	}
	return nil, fmt.Errorf("output buffer kind %q unknown", kind)
}

// removeStaleNetBuffer removes what a dead daemon's output buffer of kind
// left on a port whose guest is gone: NFQUEUE rules (they name the port,
// so they would drop the output of the next guest on a port of that name,
// e.g. a standby started here). A plug qdisc went with its tap.
func removeStaleNetBuffer(ctx context.Context, kind string, spec netBufferSpec) error {
	if kind != "nfqueue" || spec.Interface == "" {
		return nil
	}
	if err := nfqueue.RemoveRules(ctx, nfqueue.Config{QueueNum: spec.QueueNum, Interface: spec.Interface, Bridged: spec.Bridged}); err != nil {
		return fmt.Errorf("remove the NFQUEUE rules a previous daemon left on %s: %w", spec.Interface, err)
	}
	return nil
}
