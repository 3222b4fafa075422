package zimage

// The store's retention sweep (docs/design.md#the-store): a background loop that
// deletes images (and kept responses) last written more than max_age ago,
// at most once per interval per process and one instance of a cluster at a
// time.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// sweepSchedule keeps, per store (prefix and storage), when its next sweep
// is due. It outlives config reloads, so a reload (which provisions a new
// store and cleans up the old one) does not make an extra sweep: at most
// one per interval per process (docs/design.md#the-store), and one for all sites of a
// config that share a storage.
type sweepSchedule struct {
	mu   sync.Mutex
	next map[string]time.Time
}

var sweeps = &sweepSchedule{next: map[string]time.Time{}}

// claim reports whether the sweep of key is due at now and, if so, books
// the next one; otherwise it says when the next one is due.
func (sc *sweepSchedule) claim(key string, now time.Time, every time.Duration) (bool, time.Time) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if next, ok := sc.next[key]; ok && now.Before(next) {
		return false, next
	}
	sc.next[key] = now.Add(every)
	return true, time.Time{}
}

// start runs the sweeper in the background until stop (Cleanup) or until
// parent, the config's context, is done.
func (s *imageStore) start(parent context.Context) {
	ctx, cancel := context.WithCancel(parent)
	s.cancel = cancel
	s.done = make(chan struct{})
	go s.sweepLoop(ctx)
}

// stop ends the sweeper and waits for it: a sweep in progress stops at
// its next key, so Cleanup leaves no deletion running behind it.
func (s *imageStore) stop() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	<-s.done
}

func (s *imageStore) sweepLoop(ctx context.Context) {
	defer close(s.done)
	wait := s.firstSweep
	for {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		due, next := s.schedule.claim(s.scheduleKey, time.Now(), s.sweepEvery)
		if !due {
			wait = time.Until(next)
			s.wakes.Add(1)
			continue
		}
		n, err := s.sweep(ctx)
		switch {
		case errors.Is(err, errSweepBusy):
			s.logger.Debug("image store sweep skipped: another instance holds the lock", zap.String("prefix", s.prefix))
		case err != nil && ctx.Err() == nil:
			s.logger.Warn("image store sweep failed", zap.String("prefix", s.prefix), zap.Int("deleted", n), zap.Error(err))
		case n > 0:
			s.logger.Info("image store sweep", zap.String("prefix", s.prefix), zap.Int("deleted", n),
				zap.Duration("max_age", s.maxAge))
		}
		wait = s.sweepEvery
		s.wakes.Add(1)
	}
}

// errSweepBusy: another instance holds the sweep lock.
var errSweepBusy = errors.New("store: another instance is sweeping")

// sweep deletes the images last written more than max_age ago and returns
// how many. It holds the storage lock {prefix}/sweep, so that one instance
// of a cluster sweeps at a time; when the storage can tell that another
// holds it, this instance skips its turn (errSweepBusy). Serving takes no
// lock and is never delayed by a sweep.
func (s *imageStore) sweep(ctx context.Context) (int, error) {
	if s.maxAge <= 0 {
		return 0, nil
	}
	lock := s.prefix + "/sweep"
	if tl, ok := s.storage.(certmagic.TryLocker); ok {
		got, err := tl.TryLock(ctx, lock)
		if err != nil {
			return 0, fmt.Errorf("store: taking the sweep lock: %w", err)
		}
		if !got {
			return 0, errSweepBusy
		}
	} else if err := s.storage.Lock(ctx, lock); err != nil {
		return 0, fmt.Errorf("store: taking the sweep lock: %w", err)
	}
	defer func() {
		if err := s.storage.Unlock(context.WithoutCancel(ctx), lock); err != nil {
			s.logger.Warn("image store: releasing the sweep lock failed", zap.Error(err))
		}
	}()

	cutoff := time.Now().Add(-s.maxAge)
	deleted, err := s.sweepDir(ctx, s.dir, cutoff, func(name string) bool {
		_, ok := parseStoreName(name)
		return ok
	})
	metricStoreDeleted.Add(float64(deleted))
	if err != nil {
		return deleted, err
	}
	// the Responses API's kept responses live as long as their images (not
	// counted: the metric counts images)
	n, err := s.sweepDir(ctx, s.prefix+"/"+responsesDir, cutoff, func(name string) bool {
		id, ok := strings.CutSuffix(name, ".json")
		return ok && responseKeyID(id)
	})
	return deleted + n, err
}

// sweepDir deletes the entries of dir (with a trailing slash) last written
// before cutoff whose names are the store's own (valid).
func (s *imageStore) sweepDir(ctx context.Context, dir string, cutoff time.Time, valid func(name string) bool) (int, error) {
	keys, err := s.storage.List(ctx, strings.TrimSuffix(dir, "/"), false)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil // nothing stored yet
		}
		return 0, fmt.Errorf("store: listing %s: %w", dir, err)
	}
	deleted := 0
	for _, key := range keys {
		if err := ctx.Err(); err != nil {
			return deleted, err
		}
		// only the store's own entries, whatever else a storage lists
		name, ok := strings.CutPrefix(key, dir)
		if !ok || !valid(name) {
			continue
		}
		info, err := s.storage.Stat(ctx, key)
		if err != nil || !info.IsTerminal || !info.Modified.Before(cutoff) {
			continue
		}
		if err := s.storage.Delete(ctx, key); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // another instance was quicker
			}
			return deleted, fmt.Errorf("store: deleting %s: %w", name, err)
		}
		deleted++
	}
	return deleted, nil
}
