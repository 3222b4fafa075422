package zimage

// The quota counts kept in storage (without coordination): written at most
// once a quotaFlushEvery by a background flusher, read back once when a
// config that names the client is loaded, so that restarts and reloads do
// not reset a count.

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"time"

	"go.uber.org/zap"
)

// quotaFlushEvery is how often, at most, a client's count is written to
// the storage: the most a crash may lose.
const quotaFlushEvery = time.Second

// quotaFile is what the storage keeps for a client.
type quotaFile struct {
	Client  string               `json:"client"`
	Periods map[string]quotaSave `json:"periods"`
}

type quotaSave struct {
	Start time.Time `json:"start"`
	Used  int       `json:"used"`
}

func (qs *quotaSet) key(client string) string { return qs.prefix + "/quotas/" + client + ".json" }

// load reads a client's saved counts once; what is missing or unreadable
// starts at 0 (logged: a count that cannot be read is a count lost).
func (qs *quotaSet) load(ctx context.Context, st *quotaState) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.loaded {
		return
	}
	st.loaded = true
	b, err := qs.storage.Load(ctx, qs.key(st.client))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var f quotaFile
	if err == nil {
		err = json.Unmarshal(b, &f)
	}
	if err != nil {
		qs.logger.Warn("quota: the saved count could not be read; it starts at 0", zap.String("client", st.client), zap.String("key", qs.key(st.client)), zap.Error(err))
		return
	}
	now := qs.now()
	for _, q := range qs.quotas[st.client] {
		s, ok := f.Periods[q.per]
		start, end := periodBounds(q.per, now, qs.loc)
		if ok && s.Start.Equal(start) {
			st.counts[q.per] = &quotaCount{start: start, end: end, limit: q.limit, used: s.Used}
			metricQuotaUsed.WithLabelValues(st.client, q.per).Set(float64(s.Used))
		}
	}
}

// flusher writes the changed counts every quotaFlushEvery until stopped.
func (qs *quotaSet) flusher(ctx context.Context) {
	defer close(qs.done)
	t := time.NewTicker(quotaFlushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			qs.flush(ctx)
		}
	}
}

// flush writes each changed client's count to the storage.
func (qs *quotaSet) flush(ctx context.Context) {
	now := qs.now()
	for _, name := range qs.order {
		st := qs.states[name]
		st.mu.Lock()
		if !st.dirty {
			st.mu.Unlock()
			continue
		}
		f := quotaFile{Client: name, Periods: map[string]quotaSave{}}
		for _, q := range qs.quotas[name] {
			c := qs.countLocked(st, q, now)
			f.Periods[q.per] = quotaSave{Start: c.start, Used: c.used}
			metricQuotaUsed.WithLabelValues(name, q.per).Set(float64(qs.shownLocked(c)))
		}
		st.dirty = false
		st.mu.Unlock()
		b, _ := json.Marshal(f)
		if err := qs.storage.Store(ctx, qs.key(name), b); err != nil {
			if ctx.Err() == nil {
				qs.logger.Warn("quota: writing the count to the storage failed; retrying in a second", zap.String("client", name), zap.Error(err))
			}
			st.mu.Lock()
			st.dirty = true
			st.mu.Unlock()
		}
	}
}
