package zimage

// What a client and the operator are told about quotas: the usage endpoint
// (a client's own quotas and use, never another's) and the health body's
// part on quotas and coordination.

import (
	"context"
	"net/http"
	"time"
)

// usagePath answers a client its own quotas and use (also under /v1).
const usagePath = "/zimage/usage"

// endpointUsage labels the usage endpoint's answers in the metrics.
const endpointUsage = "usage"

// usageQuota is one quota in the usage answer and the health body.
type usageQuota struct {
	Period   string `json:"period"`
	Limit    int    `json:"limit"`
	Used     int    `json:"used"`
	ResetsAt string `json:"resets_at"`
}

// usage is the client's quotas and its use in their current periods.
func (qs *quotaSet) usage(ctx context.Context, client string) []usageQuota {
	out := []usageQuota{}
	if qs == nil || qs.states[client] == nil {
		return out
	}
	st, quotas, now := qs.states[client], qs.quotas[client], qs.now()
	st.mu.Lock()
	counts := make([]*quotaCount, len(quotas))
	for i, q := range quotas {
		counts[i] = qs.countLocked(st, q, now)
	}
	st.mu.Unlock()
	if qs.coord != nil {
		if totals, err := qs.coord.readQuota(ctx, client, quotaKeys(quotas, counts)); err == nil {
			st.mu.Lock()
			for i, c := range counts {
				c.shared = totals[i]
			}
			st.mu.Unlock()
		}
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	for i, q := range quotas {
		used := qs.shownLocked(counts[i])
		metricQuotaUsed.WithLabelValues(client, q.per).Set(float64(used))
		out = append(out, usageQuota{Period: q.per, Limit: q.limit, Used: used, ResetsAt: counts[i].end.UTC().Format(time.RFC3339)})
	}
	return out
}

// serveUsage answers GET /v1/zimage/usage: the asking client's own quotas
// and use, never another client's.
func (g *Gateway) serveUsage(w http.ResponseWriter, r *http.Request, c *client) {
	if r.Method != http.MethodGet {
		g.failRequest(w, endpointUsage, "", errMethod(r.Method, "GET"))
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Object string       `json:"object"`
		Client string       `json:"client"`
		Quotas []usageQuota `json:"quotas"`
	}{"usage", c.name, c.quotas.usage(r.Context(), c.name)})
}

// healthClientQuota is one client's use, by name, for the health body.
type healthClientQuota struct {
	Name   string       `json:"name"`
	Quotas []usageQuota `json:"quotas"`
}

// healthReport lists the use of every client with a quota.
func (qs *quotaSet) healthReport(ctx context.Context) []healthClientQuota {
	if qs == nil {
		return nil
	}
	var out []healthClientQuota
	for _, name := range qs.order {
		out = append(out, healthClientQuota{Name: name, Quotas: qs.usage(ctx, name)})
	}
	return out
}

// healthCluster is the health body's part on quotas and coordination.
type healthCluster struct {
	// Clients is each client with a quota, and its use
	Clients []healthClientQuota `json:"clients,omitempty"`
	// Coordination is the state of the Redis of coordination; absent
	// without it
	Coordination *healthCoordination `json:"coordination,omitempty"`
}

type healthCoordination struct {
	State string `json:"state"` // up | down
}

func (g *Gateway) healthCluster(ctx context.Context) healthCluster {
	var hc healthCluster
	hc.Clients = g.quotas.healthReport(ctx)
	if g.coord != nil {
		hc.Coordination = &healthCoordination{State: "up"}
		if !g.coord.isUp() {
			hc.Coordination.State = "down"
		}
	}
	return hc
}
