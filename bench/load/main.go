// Command load is the closed-loop HTTP load generator of bench/run.sh.
//
// Closed loop: -c workers each send a request, read the whole answer, and send
// the next, for -d (or until -n requests in all). One http.Transport with
// MaxIdleConnsPerHost = c serves them all, so every worker keeps its own
// keep-alive connection and the numbers measure request handling, not TCP
// handshakes. -burst N instead fires N requests at the same instant (each on
// its own connection) and waits for all of them: the burst and stream modes.
//
// -stream reads Server-Sent Events to the end, counting comment lines
// (": keep-alive" of streaming answers) and the largest silence between two
// lines; a stream counts as ok only when it reaches "data: [DONE]" without an
// error event.
//
// The result is one JSON line on stdout, read by run.sh:
//
//	{"requests":…,"ok":…,"errors":…,"non2xx":…,"bad":…,"rps":…,"p50_ms":…,"p99_ms":…,"min_ms":…,"max_ms":…,"wall_s":…}
//
// plus, with -stream, completed, keepalives, keepalive_min/max, ttfb_p50/p99_ms
// (time to the first SSE line) and max_gap_ms.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// headerFlags collects repeatable -header "K: V" flags.
type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ", ") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

// config is the parsed command line.
type config struct {
	url, method string
	body        []byte
	header      http.Header
	expect      []byte
	conc, n     int
	burst       int
	dur         time.Duration
	timeout     time.Duration
	stream      bool
	client      string
	preconnect  bool
	status      int // the status of a good answer; 0: any 2xx
}

// good reports whether status is what a good answer has: any 2xx, or
// exactly -status (a 304 for a revalidation).
func (cfg config) good(status int) bool {
	if cfg.status != 0 {
		return status == cfg.status
	}
	return status >= 200 && status <= 299
}

// result is the JSON line printed at the end. Latencies are milliseconds.
type result struct {
	Requests int64   `json:"requests"`
	OK       int64   `json:"ok"`
	Errors   int64   `json:"errors"` // transport errors: refused, reset, timeout
	Non2xx   int64   `json:"non2xx"`
	Bad      int64   `json:"bad"` // 2xx, but -expect missing or the stream incomplete
	RPS      float64 `json:"rps"`
	P50      float64 `json:"p50_ms"`
	P99      float64 `json:"p99_ms"`
	Min      float64 `json:"min_ms"`
	Max      float64 `json:"max_ms"`
	Wall     float64 `json:"wall_s"`
	CPU      float64 `json:"cpu_s"` // this generator's own user+system time, for run.sh's noise check

	Completed    *int64   `json:"completed,omitempty"`
	KeepAlives   *int64   `json:"keepalives,omitempty"`
	KeepAliveMin *int64   `json:"keepalive_min,omitempty"`
	KeepAliveMax *int64   `json:"keepalive_max,omitempty"`
	TTFBP50      *float64 `json:"ttfb_p50_ms,omitempty"`
	TTFBP99      *float64 `json:"ttfb_p99_ms,omitempty"`
	MaxGap       *float64 `json:"max_gap_ms,omitempty"`

	Client      string `json:"client"`
	ErrorSample string `json:"error_sample,omitempty"`
}

// worker holds one worker's tallies; merged after the run, so the hot path
// shares nothing but the request budget.
type worker struct {
	lat, ttfb       []time.Duration
	keepAlives      []int64
	maxGap          time.Duration
	ok, errs, non2x int64
	bad, completed  int64
	sample          string
	buf             bytes.Buffer
	raw             *rawConn // -client raw; nil with net/http
}

func main() {
	var cfg config
	var headers headerFlags
	var body, expect string
	flag.StringVar(&cfg.url, "url", "", "target URL (required)")
	flag.StringVar(&cfg.method, "method", "", "HTTP method (default GET, or POST when -body is set)")
	flag.StringVar(&body, "body", "", "request body")
	flag.Var(&headers, "header", `request header "K: V" (repeatable)`)
	flag.StringVar(&expect, "expect", "", "a 2xx answer must contain this string, else it counts as bad")
	flag.IntVar(&cfg.conc, "c", 32, "concurrency: workers, each with its own connection")
	flag.DurationVar(&cfg.dur, "d", 5*time.Second, "how long to send requests")
	flag.IntVar(&cfg.n, "n", 0, "total requests instead of -d (0: use -d)")
	flag.IntVar(&cfg.burst, "burst", 0, "fire this many requests at once, one each, and wait for all")
	flag.BoolVar(&cfg.preconnect, "preconnect", false, "with -burst: open all connections before the clock starts, so the burst is of requests, not of TCP handshakes")
	flag.DurationVar(&cfg.timeout, "timeout", 60*time.Second, "grace after -d (or the whole -burst) before in-flight requests are errors")
	flag.BoolVar(&cfg.stream, "stream", false, "read SSE answers to the end, counting keep-alive comments")
	flag.IntVar(&cfg.status, "status", 0, "the status a good answer has, e.g. 304 with -header \"If-None-Match: …\" (default: any 2xx); others count as non2xx")
	flag.StringVar(&cfg.client, "client", "raw", "closed-loop HTTP client: raw (minimal HTTP/1.1, cheap) or go (net/http); -burst and -stream always use go")
	flag.Parse()
	if cfg.url == "" {
		fatalf("-url is required")
	}
	cfg.body = []byte(body)
	cfg.expect = []byte(expect)
	if cfg.method == "" {
		cfg.method = http.MethodGet
		if body != "" {
			cfg.method = http.MethodPost
		}
	}
	cfg.header = http.Header{}
	for _, h := range headers {
		k, v, ok := strings.Cut(h, ":")
		if !ok {
			fatalf("bad -header %q: want \"K: V\"", h)
		}
		cfg.header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	if cfg.burst > 0 {
		cfg.conc = cfg.burst
	}
	if cfg.conc < 1 {
		fatalf("-c must be at least 1")
	}
	if cfg.burst > 0 || cfg.stream {
		cfg.client = "go"
	}
	if cfg.client != "raw" && cfg.client != "go" {
		fatalf("-client must be raw or go")
	}

	// the generator shares its core with the fake upstream; fewer GC cycles
	// leave more of that core for sending requests
	debug.SetGCPercent(400)

	res, err := run(cfg)
	if err != nil {
		fatalf("%v", err)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "load: "+format+"\n", args...)
	os.Exit(2)
}

// run drives the workers and merges their tallies.
func run(cfg config) (*result, error) {
	tmpl, err := http.NewRequest(cfg.method, cfg.url, nil)
	if err != nil {
		return nil, err
	}
	tmpl.Header = cfg.header
	if len(cfg.body) > 0 && tmpl.Header.Get("Content-Type") == "" {
		tmpl.Header.Set("Content-Type", "application/json")
	}

	dialer := &net.Dialer{
		Timeout:   cfg.timeout,
		KeepAlive: -1, // no TCP keep-alive probes: nothing idles long enough to need them
	}
	dial := dialer.DialContext
	if cfg.preconnect && cfg.burst > 0 {
		host := tmpl.URL.Host
		if tmpl.URL.Port() == "" {
			host = net.JoinHostPort(tmpl.URL.Hostname(), "80")
		}
		pool, err := preconnect(dialer, host, cfg.burst)
		if err != nil {
			return nil, err
		}
		dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			select {
			case c := <-pool:
				return c, nil
			default:
				return dialer.DialContext(ctx, network, addr)
			}
		}
	}
	tr := &http.Transport{
		Proxy:               nil, // loopback benchmark: never an HTTP_PROXY from the environment
		DialContext:         dial,
		MaxIdleConns:        cfg.conc,
		MaxIdleConnsPerHost: cfg.conc,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true, // measure the server's bytes, not gzip
		ForceAttemptHTTP2:   false,
	}
	defer tr.CloseIdleConnections()

	// one deadline for the whole run instead of a timer per request
	limit := cfg.timeout
	if cfg.burst == 0 && cfg.n == 0 {
		limit += cfg.dur
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	tmpl = tmpl.WithContext(ctx)

	var budget atomic.Int64 // requests left in -n mode
	budget.Store(int64(cfg.n))
	workers := make([]*worker, cfg.conc)
	start := make(chan struct{})
	var deadline time.Time
	var wg sync.WaitGroup
	for i := range workers {
		w := &worker{}
		if cfg.client == "raw" {
			if w.raw, err = newRawConn(cfg); err != nil {
				return nil, err
			}
			defer w.raw.close()
		}
		workers[i] = w
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for first := true; ; first = false {
				switch {
				case cfg.burst > 0:
					if !first {
						return
					}
				case cfg.n > 0:
					if budget.Add(-1) < 0 {
						return
					}
				default:
					if !time.Now().Before(deadline) {
						return
					}
				}
				if w.raw != nil {
					w.doRaw(cfg)
				} else {
					w.do(cfg, tr, tmpl)
				}
			}
		}()
	}
	begin := time.Now()
	deadline = begin.Add(cfg.dur)
	close(start)
	wg.Wait()
	wall := time.Since(begin)

	return merge(cfg, workers, wall), nil
}

// preconnect opens n connections to addr, 256 dials at a time so the
// listener's backlog never overflows, and hands them out through a channel.
// The server accepts each one now, so what the burst then measures is n
// requests arriving at once on open connections.
func preconnect(d *net.Dialer, addr string, n int) (chan net.Conn, error) {
	pool := make(chan net.Conn, n)
	sem := make(chan struct{}, 256)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := d.Dial("tcp", addr)
			if err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
				return
			}
			pool <- c
		}()
	}
	wg.Wait()
	if first != nil {
		for len(pool) > 0 {
			(<-pool).Close()
		}
		return nil, fmt.Errorf("preconnect: %w", first)
	}
	return pool, nil
}

// do sends one request and reads its answer to the end.
func (w *worker) do(cfg config, tr *http.Transport, tmpl *http.Request) {
	req := tmpl.Clone(tmpl.Context())
	if len(cfg.body) > 0 {
		req.Body = io.NopCloser(bytes.NewReader(cfg.body))
		req.ContentLength = int64(len(cfg.body))
	}
	t0 := time.Now()
	resp, err := tr.RoundTrip(req)
	if err != nil {
		w.fail(err.Error())
		return
	}
	defer resp.Body.Close()

	if !cfg.good(resp.StatusCode) {
		w.buf.Reset()
		_, _ = w.buf.ReadFrom(io.LimitReader(resp.Body, 300))
		_, _ = io.Copy(io.Discard, resp.Body)
		w.non2x++
		if w.sample == "" {
			w.sample = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, w.buf.String())
		}
		return
	}

	good := true
	if cfg.stream {
		good, err = w.readStream(cfg, resp.Body, t0)
	} else if len(cfg.expect) > 0 {
		w.buf.Reset()
		_, err = w.buf.ReadFrom(resp.Body)
		good = bytes.Contains(w.buf.Bytes(), cfg.expect)
		if !good && w.sample == "" {
			w.sample = "missing -expect in: " + truncate(w.buf.String(), 300)
		}
	} else {
		_, err = io.Copy(io.Discard, resp.Body)
	}
	if err != nil {
		w.fail("reading body: " + err.Error())
		return
	}
	w.lat = append(w.lat, time.Since(t0))
	if good {
		w.ok++
	} else {
		w.bad++
	}
}

// doRaw is do with the minimal client of raw.go.
func (w *worker) doRaw(cfg config) {
	t0 := time.Now()
	// the body is looked at only for -expect: an image is discarded unread
	status, err := w.raw.roundTrip(len(cfg.expect) > 0 || !cfg.good(200))
	if err != nil {
		w.fail(err.Error())
		return
	}
	if !cfg.good(status) {
		w.non2x++
		if w.sample == "" {
			w.sample = fmt.Sprintf("HTTP %d: %s", status, truncate(string(w.raw.body), 300))
		}
		return
	}
	w.lat = append(w.lat, time.Since(t0))
	if bytes.Contains(w.raw.body, cfg.expect) {
		w.ok++
		return
	}
	w.bad++
	if w.sample == "" {
		w.sample = "missing -expect in: " + truncate(string(w.raw.body), 300)
	}
}

// readStream reads an SSE body line by line. Lines longer than the buffer
// (the markdown chunk can be) are read in pieces; only a piece that starts a
// line is looked at for the SSE prefixes.
func (w *worker) readStream(cfg config, body io.Reader, t0 time.Time) (bool, error) {
	br := bufio.NewReaderSize(body, 4096)
	var keepAlives int64
	var done, errEvent, found bool
	found = len(cfg.expect) == 0
	atStart := true
	last := time.Now() // silence is counted from the response headers
	var maxGap time.Duration
	first := true
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			now := time.Now()
			if first {
				w.ttfb = append(w.ttfb, now.Sub(t0))
				first = false
			}
			if atStart {
				if gap := now.Sub(last); gap > maxGap {
					maxGap = gap
				}
				last = now
				switch {
				case line[0] == ':':
					keepAlives++
				case bytes.HasPrefix(line, []byte("data: [DONE]")):
					done = true
				case bytes.HasPrefix(line, []byte(`data: {"error"`)):
					errEvent = true
					if w.sample == "" {
						w.sample = "stream error: " + truncate(string(line), 300)
					}
				}
			}
			if !found && bytes.Contains(line, cfg.expect) {
				found = true
			}
			atStart = line[len(line)-1] == '\n'
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return false, err
		}
	}
	w.keepAlives = append(w.keepAlives, keepAlives)
	if maxGap > w.maxGap {
		w.maxGap = maxGap
	}
	if done && !errEvent {
		w.completed++
	} else if w.sample == "" && !errEvent {
		w.sample = "stream ended without data: [DONE]"
	}
	return done && !errEvent && found, nil
}

func (w *worker) fail(msg string) {
	w.errs++
	if w.sample == "" {
		w.sample = msg
	}
}

// merge adds up the workers' tallies into one result.
func merge(cfg config, workers []*worker, wall time.Duration) *result {
	res := &result{Wall: wall.Seconds(), Client: cfg.client}
	var lat, ttfb []time.Duration
	var kas []int64
	var completed int64
	var maxGap time.Duration
	for _, w := range workers {
		res.OK += w.ok
		res.Errors += w.errs
		res.Non2xx += w.non2x
		res.Bad += w.bad
		completed += w.completed
		lat = append(lat, w.lat...)
		ttfb = append(ttfb, w.ttfb...)
		kas = append(kas, w.keepAlives...)
		maxGap = max(maxGap, w.maxGap)
		if res.ErrorSample == "" {
			res.ErrorSample = w.sample
		}
	}
	res.Requests = res.OK + res.Bad + res.Errors + res.Non2xx
	if wall > 0 {
		res.RPS = round(float64(res.Requests)/wall.Seconds(), 1)
	}
	slices.Sort(lat)
	res.P50, res.P99 = ms(pct(lat, 50)), ms(pct(lat, 99))
	if len(lat) > 0 {
		res.Min, res.Max = ms(lat[0]), ms(lat[len(lat)-1])
	}
	res.Wall = round(res.Wall, 3)
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		res.CPU = round(time.Duration(ru.Utime.Nano()+ru.Stime.Nano()).Seconds(), 3)
	}
	if cfg.stream {
		slices.Sort(ttfb)
		slices.Sort(kas)
		var total int64
		for _, k := range kas {
			total += k
		}
		var kmin, kmax int64
		if len(kas) > 0 {
			kmin, kmax = kas[0], kas[len(kas)-1]
		}
		t50, t99, gap := ms(pct(ttfb, 50)), ms(pct(ttfb, 99)), ms(maxGap)
		res.Completed, res.KeepAlives = &completed, &total
		res.KeepAliveMin, res.KeepAliveMax = &kmin, &kmax
		res.TTFBP50, res.TTFBP99, res.MaxGap = &t50, &t99, &gap
	}
	return res
}

// pct is the nearest-rank percentile of sorted durations.
func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100
	return sorted[max(i-1, 0)]
}

func ms(d time.Duration) float64 { return round(float64(d)/float64(time.Millisecond), 3) }

func round(f float64, places int) float64 {
	p := 1.0
	for range places {
		p *= 10
	}
	return float64(int64(f*p+0.5)) / p
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
