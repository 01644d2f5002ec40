package checkpoint

import (
	"fmt"
	"os"
	"strconv"
	"testing"
)

// trials is how many trials a fault class runs: quick (quickRace under
// -race) by default, what CI runs; REMUSD_TRIALS=N for the long profile
// (scripts/trials), N per class.
func trials(quick, quickRace int) int {
	if s := os.Getenv("REMUSD_TRIALS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return n
		}
	}
	if raceEnabled {
		return quickRace
	}
	return quick
}

// reportTrials logs a class's count line (scripts/trials collects them).
func reportTrials(t *testing.T, class string, n int, format string, args ...any) {
	t.Helper()
	t.Logf("TRIALS %-22s %5d trials passed: %s", class, n, fmt.Sprintf(format, args...))
}
