package halflife

import "time"

// SetBackoffJitter makes every retry wait as jitter says, for a test; the
// returned function restores the random draw.
func SetBackoffJitter(jitter func(backoff time.Duration) time.Duration) (restore func()) {
	saved := backoffJitter
	backoffJitter = jitter
	return func() { backoffJitter = saved }
}

// DefaultBackoffJitter is the random draw, whatever SetBackoffJitter has set.
var DefaultBackoffJitter = backoffJitter
