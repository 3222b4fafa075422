package zimage

// Unit tests of the store's retention sweep (docs/design.md#the-store): what
// it deletes and keeps, that serving never waits for it, and that reloads
// and shared storages do not multiply it.

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// makeOld sets a stored image's modification time to age ago.
func makeOld(t *testing.T, fsto *certmagic.FileStorage, key string, age time.Duration) {
	t.Helper()
	old := time.Now().Add(-age)
	if err := os.Chtimes(fsto.Filename(key), old, old); err != nil {
		t.Fatal(err)
	}
}

// The sweep deletes images older than max_age, keeps newer
// ones, and touches nothing that is not one of the store's images.
func TestUnitStoreSweep(t *testing.T) {
	st, fsto := newTestFileStore(t, time.Hour)
	ctx := context.Background()
	if n, err := st.sweep(ctx); n != 0 || err != nil {
		t.Fatalf("sweep of an empty storage: %d, %v", n, err)
	}
	oldName, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	newName, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, fsto, st.dir+oldName, 2*time.Hour)
	// not the store's: other keys of the storage, and odd files beside the images
	others := []string{"certificates/acme/x.crt", "zimage/notes.txt", "zimage/images/README", "zimage/images/" + strings.ToUpper(storeTestID) + ".png", "other/images/" + storeTestID + ".png"}
	for _, k := range others {
		if err := fsto.Store(ctx, k, []byte("x")); err != nil {
			t.Fatal(err)
		}
		makeOld(t, fsto, k, 48*time.Hour)
	}
	deleted0 := storeCounter(t, metricStoreDeleted)

	n, err := st.sweep(ctx)
	if n != 1 || err != nil {
		t.Fatalf("sweep deleted %d (%v), want 1", n, err)
	}
	if fsto.Exists(ctx, st.dir+oldName) {
		t.Error("the image older than max_age is still there")
	}
	if !fsto.Exists(ctx, st.dir+newName) {
		t.Error("the new image was deleted")
	}
	for _, k := range others {
		if !fsto.Exists(ctx, k) {
			t.Errorf("%s is not the store's image, but the sweep deleted it", k)
		}
	}
	if d := storeCounter(t, metricStoreDeleted) - deleted0; d != 1 {
		t.Errorf("store_deleted_total grew by %v, want 1", d)
	}
	// the lock is released: the next sweep takes it again at once
	if n, err := st.sweep(ctx); n != 0 || err != nil {
		t.Errorf("second sweep: %d, %v", n, err)
	}

	keep, kfs := newTestFileStore(t, 0)
	name, _, _ := keep.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, kfs, keep.dir+name, 1000*24*time.Hour)
	if n, err := keep.sweep(ctx); n != 0 || err != nil || !kfs.Exists(ctx, keep.dir+name) {
		t.Errorf("max_age 0 keeps everything: sweep deleted %d (%v)", n, err)
	}
}

// gatedStorage holds every Delete until the gate opens, so a test can
// look at the world while a sweep is in progress.
type gatedStorage struct {
	*certmagic.FileStorage
	entered chan string   // a Delete has begun (key)
	gate    chan struct{} // closed: deletes go ahead
}

func (g *gatedStorage) Delete(ctx context.Context, key string) error {
	g.entered <- key
	<-g.gate
	return g.FileStorage.Delete(ctx, key)
}

// Serving is never held up by a sweep, which holds the storage
// lock, so that a second instance skips its turn rather than sweep at the
// same time.
func TestUnitStoreSweepConcurrent(t *testing.T) {
	_, fsto := newTestFileStore(t, 0)
	gs := &gatedStorage{FileStorage: fsto, entered: make(chan string, 16), gate: make(chan struct{})}
	sweeper := newImageStore(gs, "zimage", time.Hour, defaultStoreMaxSize, "", nil)
	server := newImageStore(fsto, "zimage", time.Hour, defaultStoreMaxSize, "", nil) // a second instance, same storage
	ctx := context.Background()
	oldImg, newImg := storeTestPNG(t, 8, 8), storeTestPNG(t, 8, 8)
	oldName, _, _ := server.put(ctx, oldImg)
	newName, _, _ := server.put(ctx, newImg)
	makeOld(t, fsto, server.dir+oldName, 3*time.Hour)

	type sweepResult struct {
		n   int
		err error
	}
	done := make(chan sweepResult, 1)
	go func() { n, err := sweeper.sweep(ctx); done <- sweepResult{n, err} }()
	select {
	case <-gs.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep never reached the old image")
	}

	// the sweep is in progress, between its lock and its Delete
	var wg sync.WaitGroup
	var bad atomic.Int32
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name, want := newName, newImg
			if i%2 == 1 {
				name, want = oldName, oldImg // not deleted yet: still served
			}
			w := httptest.NewRecorder()
			if server.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), name); w.Code != 200 || !bytes.Equal(w.Body.Bytes(), want) {
				bad.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := bad.Load(); n != 0 {
		t.Errorf("%d of 20 requests served during a sweep failed", n)
	}
	if n, err := server.sweep(ctx); n != 0 || !errors.Is(err, errSweepBusy) {
		t.Errorf("a second instance swept (%d, %v) while the first held the lock; want errSweepBusy", n, err)
	}

	close(gs.gate)
	var r sweepResult
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep did not finish")
	}
	if r.n != 1 || r.err != nil {
		t.Errorf("sweep: %d, %v; want 1 deleted", r.n, r.err)
	}
	if w := httptest.NewRecorder(); server.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), oldName) != 404 {
		t.Errorf("the swept image: %d, want 404", w.Code)
	}
	if w := httptest.NewRecorder(); server.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), newName) != 200 {
		t.Errorf("the new image after the sweep: %d, want 200", w.Code)
	}
}

// The sweeper runs in the background, shortly after start and
// then every interval, and stops when its store is cleaned up.
func TestUnitStoreSweeper(t *testing.T) {
	st, fsto := newTestFileStore(t, time.Hour)
	st.firstSweep, st.sweepEvery = 10*time.Millisecond, 30*time.Millisecond
	ctx := context.Background()
	a, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, fsto, st.dir+a, 2*time.Hour)
	st.start(ctx)
	waitFor(t, "the first sweep", func() bool { return !fsto.Exists(ctx, st.dir+a) })
	b, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, fsto, st.dir+b, 2*time.Hour)
	waitFor(t, "a later sweep", func() bool { return !fsto.Exists(ctx, st.dir+b) })
	st.stop()
	select {
	case <-st.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweeper did not stop")
	}
}

// Sweeps come at most once per interval per store, however
// many times the config is reloaded (each reload provisions a new store
// whose sweeper starts again) and however many sites share the storage.
func TestUnitStoreSweepSchedule(t *testing.T) {
	sc := &sweepSchedule{next: map[string]time.Time{}}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, step := range []struct {
		key     string
		at      time.Duration
		due     bool
		nextDue time.Duration
	}{
		{"a", 0, true, 0},
		{"a", time.Minute, false, time.Hour}, // a reload a minute later
		{"b", time.Minute, true, 0},          // another storage: its own turn
		{"a", 59 * time.Minute, false, time.Hour},
		{"a", time.Hour, true, 0},
		{"a", time.Hour + time.Second, false, 2 * time.Hour},
	} {
		due, next := sc.claim(step.key, t0.Add(step.at), time.Hour)
		if due != step.due || (!due && !next.Equal(t0.Add(step.nextDue))) {
			t.Errorf("claim(%s at +%v) = %v, %v; want %v, +%v", step.key, step.at, due, next.Sub(t0), step.due, step.nextDue)
		}
	}

	// two sweepers of one store (a reload: old and new config) sweep once
	_, fsto := newTestFileStore(t, 0)
	counting := &countingLister{FileStorage: fsto}
	sched := &sweepSchedule{next: map[string]time.Time{}}
	var stores []*imageStore
	for range 2 {
		st := newImageStore(counting, "zimage", time.Hour, defaultStoreMaxSize, "", nil)
		st.schedule, st.scheduleKey = sched, "same"
		st.firstSweep, st.sweepEvery = time.Millisecond, time.Hour
		st.start(context.Background())
		stores = append(stores, st)
	}
	for _, st := range stores {
		waitFor(t, "both sweepers to wake up", func() bool { return st.wakes.Load() > 0 })
	}
	for _, st := range stores {
		st.stop()
		<-st.done
	}
	if n := counting.lists.Load(); n != 1 {
		t.Errorf("two sweepers of one store swept %d times, want 1", n)
	}
}

// countingLister counts sweeps (each lists the images once, and the kept
// responses once, which are not counted).
type countingLister struct {
	*certmagic.FileStorage
	lists atomic.Int32
}

func (c *countingLister) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	if strings.HasSuffix(prefix, "/images") {
		c.lists.Add(1)
	}
	return c.FileStorage.List(ctx, prefix, recursive)
}
