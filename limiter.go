package zimage

import (
	"context"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// limiters holds one limiter per upstream (URL and limit), shared by every
// handler that uses it and kept across config reloads while either the old
// or the new config still references it, so a reload never lets more than
// max_concurrent generations through at once.
var limiters = caddy.NewUsagePool()

// limiter is a counting semaphore for generations in flight.
type limiter struct {
	slots chan struct{}
}

func newLimiter(n int) *limiter {
	return &limiter{slots: make(chan struct{}, n)}
}

// Destruct implements caddy.Destructor; a limiter holds no resources
// beyond memory.
func (l *limiter) Destruct() error { return nil }

// acquire waits up to timeout for a slot. It returns errQueueFull when the
// wait times out, and the context's error when the client leaves (which
// frees its place in the queue at once).
func (l *limiter) acquire(ctx context.Context, timeout time.Duration) error {
	select {
	case l.slots <- struct{}{}:
		return nil
	default:
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case l.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return errQueueFull(retryAfterSeconds(timeout))
	}
}

func (l *limiter) release() { <-l.slots }

// retryAfterSeconds suggests waiting about as long as the queue allows.
func retryAfterSeconds(d time.Duration) string {
	return strconv.Itoa(max(1, int((d+time.Second-1)/time.Second)))
}
