package zimage

// The Prometheus metrics (docs/design.md#observability), scraped through Caddy's own `metrics`
// handler after a known sequence of requests. The collectors are
// process-wide and survive reloads, so the tests compare two scrapes.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrapeResult is one scrape: sample values by series key (see seriesKey)
// and the type of each metric family.
type scrapeResult struct {
	values map[string]float64
	types  map[string]string
}

// scrape reads /metrics from the test site (host, when given, picks the
// virtual host) and parses the Prometheus text format.
func scrape(t *testing.T, host ...string) scrapeResult {
	t.Helper()
	var hdr []string
	if len(host) > 0 {
		hdr = []string{"Host", host[0]}
	}
	return parseScrape(t, send(context.Background(), http.MethodGet, "/metrics", "", hdr...))
}

// scrapeAdmin reads /metrics from Caddy's admin endpoint.
func scrapeAdmin(t *testing.T) scrapeResult {
	t.Helper()
	var r result
	resp, err := testClient(10 * time.Second).Get(fmt.Sprintf("http://localhost:%d/metrics", adminPort))
	if err != nil {
		r.err = err
	} else {
		defer resp.Body.Close()
		r.status = resp.StatusCode
		r.body, r.err = io.ReadAll(resp.Body)
	}
	return parseScrape(t, r)
}

func parseScrape(t *testing.T, r result) scrapeResult {
	t.Helper()
	if r.err != nil || r.status != http.StatusOK {
		t.Fatalf("scraping /metrics: status %d, %v: %.200s", r.status, r.err, r.body)
	}
	s := scrapeResult{values: map[string]float64{}, types: map[string]string{}}
	sc := bufio.NewScanner(strings.NewReader(string(r.body)))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			s.types[f[2]] = f[3]
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels, value, err := parseSample(line)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		s.values[seriesKey(name, labels)] = value
	}
	return s
}

// parseSample reads `name{k="v",...} value` or `name value`.
func parseSample(line string) (string, map[string]string, float64, error) {
	labels := map[string]string{}
	i := strings.IndexAny(line, "{ ")
	if i < 0 {
		return "", nil, 0, fmt.Errorf("no value")
	}
	name, rest := line[:i], line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, ",")
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			eq := strings.Index(rest, `="`)
			if eq < 0 {
				return "", nil, 0, fmt.Errorf("bad labels")
			}
			key := rest[:eq]
			rest = rest[eq+2:]
			var val strings.Builder
			for {
				if rest == "" {
					return "", nil, 0, fmt.Errorf("unterminated label value")
				}
				c := rest[0]
				rest = rest[1:]
				if c == '"' {
					break
				}
				if c == '\\' && rest != "" {
					c, rest = rest[0], rest[1:]
					if c == 'n' {
						c = '\n'
					}
				}
				val.WriteByte(c)
			}
			labels[key] = val.String()
		}
	}
	f := strings.Fields(rest)
	if len(f) == 0 {
		return "", nil, 0, fmt.Errorf("no value")
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return name, labels, v, err
}

// seriesKey names a series: the metric name and its labels, sorted.
func seriesKey(name string, labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(name + "{")
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", k, labels[k])
	}
	b.WriteString("}")
	return b.String()
}

// get is a series' value (0 when absent); labels are name, value pairs.
func (s scrapeResult) get(name string, labels ...string) float64 {
	m := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		m[labels[i]] = labels[i+1]
	}
	return s.values[seriesKey(name, m)]
}

// delta is how much a series grew since before.
func (s scrapeResult) delta(before scrapeResult, name string, labels ...string) float64 {
	return s.get(name, labels...) - before.get(name, labels...)
}

// TestOpsMetrics: after a known sequence of requests, every zimage metric
// moved by exactly what those requests imply; the model label is the
// configured name whatever the client sent; the families have the names and
// types of docs/design.md#observability.
func TestOpsMetrics(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"a detailed scene","aspect_ratio":"3:2"}`)
	startCaddy(t, opsSite(up.endpoint(), llm, "timeout 1s\n\t\tretries 0\n\t\tmax_concurrent 4\n\t\tqueue_timeout 5s",
		"model Ops-Metrics {\n\t\talias dall-e-3\n\t}")+"\nmetrics /metrics")
	before := scrape(t)

	chat := func(body string, want int, hdr ...string) {
		t.Helper()
		if status, _, b := do(t, http.MethodPost, "/v1/chat/completions", body, hdr...); status != want {
			t.Fatalf("status %d, want %d: %s", status, want, b)
		}
	}
	if status, _, b := do(t, http.MethodGet, "/v1/models", ""); status != http.StatusOK {
		t.Fatalf("models: %d %s", status, b)
	}
	chat(`{"model":"dall-e-3","messages":[{"role":"user","content":"a cat"}]}`, 200) // enhance ok
	chat(`{"model":"DALL-E-3","prompt":"a dog no-enhance"}`, 200)                    // skipped
	chat(`{"prompt":"a dog no-enhance","stream":true}`, 200)                         // skipped, streamed
	llm.setHandler(failWith(500, `{}`))
	if status, _, b := do(t, http.MethodPost, "/v1/images/generations", `{"model":"dall-e-3","prompt":"a bird"}`); status != http.StatusOK {
		t.Fatalf("images: %d %s", status, b) // enhance failed, generation fine
	}
	llm.setHandler(nil)
	for _, h := range []http.HandlerFunc{
		failWith(429, `{"error":"slow down"}`),                                // 429, status_429
		failWith(200, `{"success":false,"error":"refused"}`),                  // 502, bad_response
		failWith(500, `{"error":"boom"}`),                                     // 502, status_5xx
		func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }, // 504, timeout
	} {
		up.setHandler(h)
		status, _, _ := do(t, http.MethodPost, "/v1/chat/completions", `{"prompt":"fails no-enhance"}`)
		if status < 400 {
			t.Fatalf("failing upstream answered %d", status)
		}
	}
	chat(`{"model":"gpt-4","prompt":"unknown model"}`, 404)
	chat(`{"prompt":"bad key"}`, 401, "Authorization", "Bearer wrong")

	// a generation held at the upstream is in flight
	g := newGate(t)
	up.setHandler(g.handler)
	held := sendAsync(http.MethodPost, "/v1/chat/completions", `{"prompt":"held no-enhance"}`)
	waitFor(t, "the held generation", func() bool { return up.active.Load() == 1 })
	if d := scrape(t).delta(before, "caddy_zimage_generations_in_flight"); d != 1 {
		t.Errorf("generations_in_flight while one is held: %+v, want 1", d)
	}
	g.open()
	if r := await(t, held); r.status != http.StatusOK {
		t.Fatalf("held: %d %s", r.status, r.body)
	}

	after := scrape(t)
	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"caddy_zimage_requests_total", []string{"endpoint", "models", "model", "", "code", "200"}, 1},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "Ops-Metrics", "code", "200"}, 4},
		{"caddy_zimage_requests_total", []string{"endpoint", "images_generations", "model", "Ops-Metrics", "code", "200"}, 1},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "Ops-Metrics", "code", "429"}, 1},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "Ops-Metrics", "code", "502"}, 2},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "Ops-Metrics", "code", "504"}, 1},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "", "code", "404"}, 1},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "", "code", "401"}, 1},
		{"caddy_zimage_enhance_total", []string{"outcome", "ok"}, 1},
		{"caddy_zimage_enhance_total", []string{"outcome", "skipped"}, 7},
		{"caddy_zimage_enhance_total", []string{"outcome", "failed"}, 1},
		{"caddy_zimage_enhance_total", []string{"outcome", "disabled"}, 0},
		{"caddy_zimage_upstream_errors_total", []string{"kind", "status_429"}, 1},
		{"caddy_zimage_upstream_errors_total", []string{"kind", "bad_response"}, 1},
		{"caddy_zimage_upstream_errors_total", []string{"kind", "status_5xx"}, 1},
		{"caddy_zimage_upstream_errors_total", []string{"kind", "timeout"}, 1},
		{"caddy_zimage_upstream_errors_total", []string{"kind", "refused"}, 0},
		{"caddy_zimage_generation_duration_seconds_count", []string{"model", "Ops-Metrics"}, 5},
		{"caddy_zimage_queue_wait_seconds_count", nil, 9},
		{"caddy_zimage_generations_in_flight", nil, 0},
	} {
		if d := after.delta(before, tc.name, tc.labels...); d != tc.want {
			t.Errorf("%s%v grew by %v, want %v", tc.name, tc.labels, d, tc.want)
		}
	}
	for key := range after.values {
		if strings.HasPrefix(key, "caddy_zimage_") && (strings.Contains(strings.ToLower(key), `model="dall-e-3"`) || strings.Contains(key, `model="gpt-4"`)) {
			t.Errorf("a client's model string became a label: %s", key)
		}
	}
	// the admin endpoint's /metrics serves the same registry
	key := []string{"endpoint", "chat_completions", "model", "Ops-Metrics", "code", "200"}
	if got, want := scrapeAdmin(t).get("caddy_zimage_requests_total", key...), after.get("caddy_zimage_requests_total", key...); got != want || got == 0 {
		t.Errorf("admin /metrics: requests_total%v = %v, the site's /metrics says %v", key, got, want)
	}
	for name, typ := range map[string]string{
		"caddy_zimage_requests_total":              "counter",
		"caddy_zimage_generation_duration_seconds": "histogram",
		"caddy_zimage_enhance_total":               "counter",
		"caddy_zimage_upstream_errors_total":       "counter",
		"caddy_zimage_generations_in_flight":       "gauge",
		"caddy_zimage_queue_wait_seconds":          "histogram",
	} {
		if after.types[name] != typ {
			t.Errorf("%s has type %q, want %s", name, after.types[name], typ)
		}
	}
}

// TestOpsMetricsSurviveReloadAndSites: loading a config with two gateways
// (two sites, so two provisionings into one registry) neither fails nor
// resets a counter, and both sites count under their own model names.
func TestOpsMetricsSurviveReloadAndSites(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 5s", "")+"\nmetrics /metrics")
	if status, _, b := do(t, http.MethodPost, "/v1/chat/completions", `{"prompt":"before the reload"}`); status != http.StatusOK {
		t.Fatalf("status %d: %s", status, b)
	}
	before := scrape(t)

	upB := newFakeUpstream(t)
	startCaddyRaw(t, twoSites(up, upB, ""))
	hostA := fmt.Sprintf("a.localhost:%d", httpPort)
	reloaded := scrape(t, hostA)
	// counters and histograms only grow (a request of another test that
	// is still finishing may add to them, but none may reset)
	n := 0
	for key, v := range before.values {
		if !strings.HasPrefix(key, "caddy_zimage_") || strings.HasPrefix(key, "caddy_zimage_generations_in_flight") {
			continue
		}
		n++
		if got, ok := reloaded.values[key]; !ok || got < v {
			t.Errorf("%s went from %v to %v (present: %v) across the reload", key, v, got, ok)
		}
	}
	if n == 0 {
		t.Fatal("no caddy_zimage_ series in the first scrape")
	}

	for _, tc := range []struct{ host, key string }{
		{hostA, testClientKey},
		{fmt.Sprintf("b.localhost:%d", httpPort), keyB},
	} {
		if r := send(context.Background(), http.MethodPost, "/v1/chat/completions", `{"prompt":"after the reload"}`, "Host", tc.host, "Authorization", "Bearer "+tc.key); r.status != http.StatusOK {
			t.Fatalf("%s: status %d: %s", tc.host, r.status, r.body)
		}
	}
	after := scrape(t, hostA)
	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "Model-A", "code", "200"}, 1},
		{"caddy_zimage_requests_total", []string{"endpoint", "chat_completions", "model", "Model-B", "code", "200"}, 1},
		{"caddy_zimage_enhance_total", []string{"outcome", "disabled"}, 2},
		{"caddy_zimage_generation_duration_seconds_count", []string{"model", "Model-B"}, 1},
	} {
		if d := after.delta(reloaded, tc.name, tc.labels...); d != tc.want {
			t.Errorf("%s%v grew by %v, want %v", tc.name, tc.labels, d, tc.want)
		}
	}
}
