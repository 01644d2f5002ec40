//go:build race

package checkpoint

// raceEnabled lets slow randomized tests do fewer trials under -race.
const raceEnabled = true
