// Package sdnotify tells systemd about the daemon's state (sd_notify(3)):
// READY=1 once it serves, STOPPING=1 when it shuts down, so that a unit
// with Type=notify orders dependent units correctly and `systemctl
// restart` waits for the new daemon to be ready.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// Socket is the environment variable systemd passes the notification
// socket in.
const Socket = "NOTIFY_SOCKET"

// Notify sends state (e.g. "READY=1\nSTATUS=serving") to the socket named
// by $NOTIFY_SOCKET. Without it (not started by systemd with
// Type=notify) it does nothing and reports false.
func Notify(state string) (bool, error) {
	addr := os.Getenv(Socket)
	if addr == "" {
		return false, nil
	}
	if !strings.HasPrefix(addr, "/") && !strings.HasPrefix(addr, "@") {
		return false, fmt.Errorf("sdnotify: %s=%q is neither a path nor an abstract socket", Socket, addr)
	}
	if strings.HasPrefix(addr, "@") {
		addr = "\x00" + addr[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	defer conn.Close()
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte(state)); err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	return true, nil
}
