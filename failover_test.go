package zimage

// Failover and rests (docs/design.md#failover-and-rests): which failures move
// a generation to another account, how long an account rests, and that a
// request's own content never rests more than one account. Integration
// tests run a real Caddy against a fake service that tells the accounts
// apart by their keys (helpers in accounts_test.go).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// How long a failing account rests; the client's
// Retry-After after a 429 is the same figure, in whole seconds.
func TestUnitRestFor(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		name       string
		ue         upstreamError
		pointsRest time.Duration
		want       time.Duration
	}{
		{"429 with seconds", upstreamError{kind: kind429, retryAfter: "7"}, 0, 7 * time.Second},
		{"429 with a date", upstreamError{kind: kind429, retryAfter: now.Add(90 * time.Second).Format(http.TimeFormat)}, 0, 90 * time.Second},
		{"429 without Retry-After", upstreamError{kind: kind429}, 0, 30 * time.Second},
		{"429 Retry-After 0", upstreamError{kind: kind429, retryAfter: "0"}, 0, time.Second},
		{"429 Retry-After a day", upstreamError{kind: kind429, retryAfter: "86400"}, 0, time.Hour},
		{"429 date in the past", upstreamError{kind: kind429, retryAfter: now.Add(-time.Minute).Format(http.TimeFormat)}, 0, time.Second},
		{"429 Retry-After 999999999", upstreamError{kind: kind429, retryAfter: "999999999"}, 0, time.Hour},
		{"429 Retry-After that overflows nanoseconds", upstreamError{kind: kind429, retryAfter: "99999999999999"}, 0, time.Hour},
		{"429 date a year ahead", upstreamError{kind: kind429, retryAfter: now.AddDate(1, 0, 0).Format(http.TimeFormat)}, 0, time.Hour},
		{"5xx", upstreamError{kind: kind5xx, retryAfter: "99"}, 0, 10 * time.Second},
		{"connection error", upstreamError{kind: kindRefused}, 0, 10 * time.Second},
		{"blocked", upstreamError{kind: kindBlocked}, 0, 10 * time.Second},
		{"no points, default", upstreamError{kind: kindNoPoints}, 0, time.Hour},
		{"no points, points_rest 20m", upstreamError{kind: kindNoPoints, retryAfter: "5"}, 20 * time.Minute, 20 * time.Minute},
		{"no points, points_rest 6h: not capped", upstreamError{kind: kindNoPoints}, 6 * time.Hour, 6 * time.Hour},
	} {
		if got := restFor(&tc.ue, tc.pointsRest, now); got != tc.want {
			t.Errorf("%s: rest %s, want %s", tc.name, got, tc.want)
		}
	}

	// the client's Retry-After after a 429 (computed from now, so the
	// date forms are left to the rest table above)
	for ra, want := range map[string]string{"7": "7", "": "30", "0": "1", "86400": "3600", "999999999": "3600", "99999999999999": "3600"} {
		ae := (&upstreamError{kind: kind429, retryAfter: ra}).apiError(newScrubber(nil))
		if ae.status != http.StatusTooManyRequests || ae.retryAfter != want {
			t.Errorf("429 with Retry-After %q: status %d, Retry-After %q, want 429 and %q", ra, ae.status, ae.retryAfter, want)
		}
	}
}

// The same account's backoff doubles from 250ms with its jitter, and
// grows (never wraps into no wait) however many attempts came before:
// a pool of many accounts may have failed over 40 times first.
func TestUnitRetryBackoff(t *testing.T) {
	for _, tc := range []struct {
		attempt int
		jitter  float64
		want    time.Duration
	}{
		{0, 0.5, 250 * time.Millisecond},
		{1, 0.5, 500 * time.Millisecond},
		{2, 0, 500 * time.Millisecond},
		{3, 0.99, 2980 * time.Millisecond},
	} {
		if got := retryBackoff(tc.attempt, tc.jitter); got != tc.want {
			t.Errorf("attempt %d jitter %v: %v, want %v", tc.attempt, tc.jitter, got, tc.want)
		}
	}
	prev := retryBackoff(0, 0)
	for attempt := 1; attempt <= 64; attempt++ {
		d := retryBackoff(attempt, 0)
		if d < prev || d < time.Hour && attempt > 14 {
			t.Fatalf("attempt %d: backoff %v after %v: it must keep growing past any timeout", attempt, d, prev)
		}
		prev = d
	}
}

// A success ends an account's rest, whatever made it (the account may
// have been topped up, or never been at fault), except what a 429 asked
// for: its Retry-After holds.
func TestUnitSuccessEndsRest(t *testing.T) {
	resting := func(a *account) (bool, time.Duration) {
		limMu.Lock()
		defer limMu.Unlock()
		return a.lim.restingLocked(time.Now()), time.Until(a.lim.restUntil).Round(time.Second)
	}
	for _, tc := range []struct {
		name  string
		rests []upstreamError
		want  time.Duration // the rest left after the success; 0: none
	}{
		{"5xx", []upstreamError{{kind: kind5xx}}, 0},
		{"blocked", []upstreamError{{kind: kindBlocked}}, 0},
		{"no points", []upstreamError{{kind: kindNoPoints}}, 0},
		{"429", []upstreamError{{kind: kind429, retryAfter: "60"}}, 60 * time.Second},
		{"429, then out of points", []upstreamError{{kind: kind429, retryAfter: "60"}, {kind: kindNoPoints}}, 60 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := unitAccountPool(0, 0)
			a := p.accounts[0]
			for _, ue := range tc.rests {
				p.rest(a, &ue)
			}
			if r, _ := resting(a); !r {
				t.Fatal("the account does not rest")
			}
			p.answered(a)
			r, left := resting(a)
			if r != (tc.want > 0) || r && left != tc.want {
				t.Errorf("after a success: resting %v for %s, want %s", r, left, tc.want)
			}
			if p.allOutOfPoints() {
				t.Error("the pool is still out of points")
			}
		})
	}
}

// One request rests at most one account for a kind its content could
// cause: a pool of three accounts that all answer no points is all
// resting after three requests, each of which rests one, and only the
// third tells the client that every account is out.
func TestUnitOneRequestRestsOneAccount(t *testing.T) {
	for _, kind := range []string{kindNoPoints, kindBlocked} {
		t.Run(kind, func(t *testing.T) {
			p := unitAccountPool(0, 0, 0)
			p.retries = 2
			for i, want := range []struct {
				tries  int
				allOut bool
			}{{2, false}, {2, false}, {1, kind == kindNoPoints}} {
				tries := 0
				_, _, err := p.run(t.Context(), func(ctx context.Context, a *account) (upstreamResult, *upstreamError) {
					tries++
					return upstreamResult{}, &upstreamError{kind: kind, message: "no"}
				})
				var ue *upstreamError
				if !errors.As(err, &ue) || ue.kind != kind || ue.allOut != want.allOut || tries != want.tries {
					t.Errorf("request %d: %d tries, error %+v; want %d tries, kind %s, all out %v", i+1, tries, err, want.tries, kind, want.allOut)
				}
				resting := 0
				limMu.Lock()
				for _, a := range p.accounts {
					if a.lim.restingLocked(time.Now()) {
						resting++
					}
				}
				limMu.Unlock()
				if w := min(i+1, 2+btoi(kind == kindNoPoints)); resting != w {
					t.Errorf("after request %d: %d accounts rest, want %d", i+1, resting, w)
				}
			}
		})
	}
}

// TestAccountsFailoverRestsAccount (docs/design.md#failover-and-rests): account a always answers
// 429 with Retry-After: 1. The first request tries a (first in turn), then
// b at once, and succeeds; a rests for a second, during which every
// request goes straight to b; after the rest a is tried again (and fails
// over again). The client never sees the 429.
func TestAccountsFailoverRestsAccount(t *testing.T) {
	up := newFakeUpstream(t)
	var mu sync.Mutex
	var aCalls []time.Time
	up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		aCalls = append(aCalls, time.Now())
		mu.Unlock()
		failWith(429, `{"error":"account a is rate limited"}`, "Retry-After", "1")(w, r)
	}}))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
	before, mark := scrape(t), markLog(t)
	aCount := func() int { mu.Lock(); defer mu.Unlock(); return len(aCalls) }

	requests := 0
	deadline := time.Now().Add(10 * time.Second)
	for aCount() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("account a was not tried again after its rest (%d requests, %d calls to a)", requests, aCount())
		}
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("failover", 800+requests, ""))
		requests++
		if status != http.StatusOK || !strings.Contains(string(body), "https://img.example.com/b.png") {
			t.Fatalf("request %d: status %d, want b's image: %s", requests, status, body)
		}
		if requests == 1 && aCount() != 1 {
			t.Fatalf("the first request did not try a first (%d calls to a)", aCount())
		}
		time.Sleep(20 * time.Millisecond) // the polling interval, not a synchronisation
	}
	mu.Lock()
	gap := aCalls[1].Sub(aCalls[0])
	mu.Unlock()
	if gap < time.Second {
		t.Errorf("account a was called again %s after its 429, within its 1s rest", gap)
	}
	if requests < 3 {
		t.Errorf("only %d requests during a's rest: the test did not see a resting", requests)
	}
	if n := up.keyCalls(testAccountKeyB); n != requests {
		t.Errorf("%d calls to b for %d requests, want one each", n, requests)
	}

	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", "a", "reason", "status_429"); d != 2 {
		t.Errorf("rests of a counted %v, want 2", d)
	}
	if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "status_429"); d != 2 {
		t.Errorf("429s counted %v, want 2 (one per failed attempt)", d)
	}
	if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", "b", "reason", "status_429"); d != 0 {
		t.Errorf("b rested %v times", d)
	}
	rests := mark.find(t, "image service account rests", func(l map[string]any) bool {
		return l["level"] == "warn" && l["account"] == "a" && l["reason"] == "status_429" && l["rest"] == float64(1)
	})
	retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool {
		return l["account"] == "a" && l["next_account"] == "b" && l["kind"] == "status_429"
	})
	served := generationLines(t, mark, 200)
	if len(rests) != 2 || len(retried) != 2 || len(served) != requests {
		t.Errorf("%d rest lines, %d failover lines, %d generation lines; want 2, 2, %d", len(rests), len(retried), len(served), requests)
	}
	for _, l := range served {
		if l["account"] != "b" {
			t.Errorf("a generation line names account %v, want b", l["account"])
		}
	}
}

// TestAccountsFailoverKinds (docs/design.md#failover-and-rests): a connection error, a
// 5xx, a Cloudflare challenge and a 429 without Retry-After move the
// attempt to the other account and rest the failing one for 10 s (30 s
// for the 429); other failures neither fail over nor rest an account.
func TestAccountsFailoverKinds(t *testing.T) {
	html := func(status int) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(status)
			fmt.Fprint(w, "<!DOCTYPE html><title>Just a moment...</title>")
		}
	}
	for _, tc := range []struct {
		name     string
		a        http.HandlerFunc
		upstream string
		status   int    // of the first request
		kind     string // rest reason; "" for none
		rest     float64
	}{
		{"dropped connection", dropConnection, "", 200, kindRefused, 10},
		{"500", failWith(500, `{"error":"boom"}`), "", 200, kind5xx, 10},
		{"502", failWith(502, `{}`), "", 200, kind5xx, 10},
		{"503 JSON", failWith(503, `{"error":"busy"}`), "", 200, kind5xx, 10},
		{"403 challenge", html(403), "", 200, kindBlocked, 10},
		{"503 challenge", html(503), "", 200, kindBlocked, 10},
		{"429 without Retry-After", failWith(429, `{"error":"slow"}`), "", 200, kind429, 30},
		{"429, retries 0: passed on, a rests", failWith(429, `{"error":"slow"}`, "Retry-After", "5"), "retries 0", 429, kind429, 5},
		{"429 Retry-After 999999999: rests the cap", failWith(429, `{"error":"slow"}`, "Retry-After", "999999999"), "", 200, kind429, 3600},
		{"402: no points, rests 1h", failWith(402, `{"error":"payment required"}`), "", 200, kindNoPoints, 3600},
		{"积分不足: no points, rests points_rest", failWith(200, `{"success":false,"message":"积分不足"}`), "points_rest 20m", 200, kindNoPoints, 1200},
		{"400: no failover", failWith(400, `{"error":"bad prompt"}`), "", 502, "", 0},
		{"success false: no failover", failWith(200, `{"success":false,"error":"nsfw"}`), "", 502, "", 0},
		{"403 JSON: no failover", failWith(403, `{"error":"forbidden"}`), "", 502, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: tc.a}))
			startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s\n\t\t"+tc.upstream, ""))
			before, mark := scrape(t), markLog(t)

			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("fail over?", 900, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 1 || (tc.status == 200) != (b == 1) {
				t.Fatalf("calls a %d, b %d", a, b)
			}
			if tc.kind == "" {
				if n := len(mark.find(t, "image service account rests", nil)); n != 0 {
					t.Errorf("%d rests, want none", n)
				}
				return
			}
			if rested := grewSince(t, before, "caddy_zimage_upstream_account_rests_total", "account", "a", "reason", tc.kind); rested != 1 {
				t.Errorf("rests of a for %s: %v, want 1", tc.kind, rested)
			}
			if l := mark.find(t, "image service account rests", nil); len(l) != 1 || l[0]["rest"] != tc.rest {
				t.Errorf("rest lines %v, want one of %vs", l, tc.rest)
			}
			// while a rests, the next request goes to b alone
			if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("b only", 901, "")); status != http.StatusOK {
				t.Fatalf("second request: status %d: %s", status, body)
			}
			if a := up.keyCalls(testAccountKeyA); a != 1 {
				t.Errorf("a was called %d times, want 1: it rests", a)
			}
		})
	}
}

// TestAccountsAllFail (docs/design.md#failover-and-rests): when no account can answer, the client
// gets the last account's error in the envelope (its 429 with its own
// Retry-After), with any key it echoed scrubbed.
func TestAccountsAllFail(t *testing.T) {
	echo := func(status int, msg string, hdr ...string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			failWith(status, `{"error":"`+msg+` (you sent `+r.Header.Get("Authorization")+`)"}`, hdr...)(w, r)
		}
	}
	for _, tc := range []struct {
		name         string
		a, b, c      http.HandlerFunc
		status       int
		want, notice string // in the message; notice must not be
		retryAfter   string
	}{
		{"5xx", echo(503, "a is down"), echo(500, "b is down"), nil, 502, "b is down", "a is down", ""},
		{"429s", echo(429, "a is limited", "Retry-After", "7"), echo(429, "b is limited", "Retry-After", "3"), nil, 429, "b is limited", "a is limited", "3"},
		{"three accounts", echo(502, "a is down"), dropConnection, echo(500, "c is down"), 502, "c is down", "a is down", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: tc.a, testAccountKeyB: tc.b, testAccountKeyC: tc.c}))
			accounts := accountBlock("a", testAccountKeyA) + accountBlock("b", testAccountKeyB)
			if tc.c != nil {
				accounts += accountBlock("c", testAccountKeyC)
			}
			startCaddy(t, accountsSite(up.endpoint(), accounts, "timeout 10s", ""))
			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody answers", 950, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			e := apiErr(t, body)
			if !strings.Contains(e.Message, tc.want) || strings.Contains(e.Message, tc.notice) || !strings.Contains(e.Message, "[redacted]") {
				t.Errorf("message %q, want the last account's (%q) with its key redacted", e.Message, tc.want)
			}
			if hdr.Get("Retry-After") != tc.retryAfter {
				t.Errorf("Retry-After %q, want %q", hdr.Get("Retry-After"), tc.retryAfter)
			}
			want := map[string]int{testAccountKeyA: 1, testAccountKeyB: 1, testAccountKeyC: 0}
			if tc.c != nil {
				want[testAccountKeyC] = 1
			}
			for key, n := range want {
				if got := up.keyCalls(key); got != n {
					t.Errorf("account %s called %d times, want %d", keyNames[key], got, n)
				}
			}
		})
	}
}

// TestAccountsRestSurvivesReload (docs/design.md#accounts): a rest
// period outlives a reload as the limits do: after a's 429 (Retry-After
// 30) a reload keeps the accounts, and the new config's requests still go
// to b alone.
func TestAccountsRestSurvivesReload(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: failWith(429, `{"error":"later"}`, "Retry-After", "30")}))
	accounts := accountBlock("a", testAccountKeyA, "max_concurrent 4") + accountBlock("b", testAccountKeyB, "max_concurrent 4")
	startCaddy(t, accountsSite(up.endpoint(), accounts, "timeout 10s", "stream_keepalive 5s"))
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("a rests", 960, "")); status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	startCaddy(t, accountsSite(up.endpoint(), accounts, "timeout 10s", "stream_keepalive 6s"))
	for i := range 4 {
		if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("after the reload", 961+i, "")); status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
	}
	if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 1 || b != 5 {
		t.Errorf("calls a %d, b %d; want 1 and 5: a rests across the reload", a, b)
	}
}

// TestAccountsBlocked (docs/design.md#failover-and-rests): a Cloudflare challenge (an HTML 403 or
// 503) is a 502 saying the service's Cloudflare protection refused the
// request, counted as kind blocked, with none of the page in the answer
// or the log; a 403 with a JSON body stays the service's own error.
func TestAccountsBlocked(t *testing.T) {
	const canary = "cf-challenge-canary-4b2e"
	page := "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>" + canary + "</body></html>"
	up := newFakeUpstream(t)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s", "")+"\nmetrics /metrics")
	mark := markLog(t)
	for _, tc := range []struct {
		name      string
		h         http.HandlerFunc
		code      string
		message   string
		kind      string
		wantCalls int
	}{
		{"403 challenge", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=UTF-8")
			w.Header().Set("Cf-Mitigated", "challenge")
			w.WriteHeader(403)
			fmt.Fprint(w, page)
		}, "upstream_blocked", "Cloudflare protection refused the request", kindBlocked, 1},
		{"503 challenge without a type", func(w http.ResponseWriter, r *http.Request) {
			w.Header()["Content-Type"] = nil
			w.WriteHeader(503)
			fmt.Fprint(w, "\n"+page)
		}, "upstream_blocked", "Cloudflare protection refused the request", kindBlocked, 1},
		{"403 JSON", failWith(403, `{"success":false,"error":"account suspended"}`), "upstream_error", "account suspended", kindBadResponse, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.setHandler(tc.h)
			calls := len(up.Calls())
			before := scrape(t)
			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("blocked?", 1200, ""))
			if status != http.StatusBadGateway {
				t.Fatalf("status %d, want 502: %s", status, body)
			}
			if e := apiErr(t, body); e.Code != tc.code || !strings.Contains(e.Message, tc.message) {
				t.Errorf("error %+v, want code %s with %q", e, tc.code, tc.message)
			}
			if strings.Contains(string(body), canary) || strings.Contains(string(body), "<") {
				t.Errorf("the page reached the client: %s", body)
			}
			if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", tc.kind); d != 1 {
				t.Errorf("errors of kind %s counted %v, want 1", tc.kind, d)
			}
			if n := len(up.Calls()) - calls; n != tc.wantCalls {
				t.Errorf("%d calls, want %d (a challenge is not retried on the same account)", n, tc.wantCalls)
			}
		})
	}
	for _, l := range mark.lines(t) {
		if s := fmt.Sprint(l); strings.Contains(s, canary) || strings.Contains(s, "Just a moment") {
			t.Errorf("the challenge page reached the log: %s", s)
		}
	}
	if l := mark.find(t, "image service call failed", func(l map[string]any) bool { return l["kind"] == kindBlocked }); len(l) != 2 {
		t.Errorf("%d warn lines of kind blocked, want 2", len(l))
	}
}

// TestAccountsRetryAfterCapped: the client's Retry-After
// after the service's 429 is what the gateway does with the account, its
// rest: the service's figure, capped at an hour; 30 s when it gives none.
// Never the service's header as it came.
func TestAccountsRetryAfterCapped(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s\n\t\tretries 0", ""))
	for _, tc := range []struct {
		name, header, want string
	}{
		{"999999999 seconds", "999999999", "3600"},
		{"a date next year", time.Now().AddDate(1, 0, 0).UTC().Format(http.TimeFormat), "3600"},
		{"7 seconds", "7", "7"},
		{"none", "", "30"},
		{"garbage", "soon", "30"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hdr []string
			if tc.header != "" {
				hdr = []string{"Retry-After", tc.header}
			}
			up.setHandler(failWith(429, `{"error":"slow down"}`, hdr...))
			status, h, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("rate limited", 1300, ""))
			if status != http.StatusTooManyRequests {
				t.Fatalf("status %d, want 429: %s", status, body)
			}
			if got := h.Get("Retry-After"); got != tc.want {
				t.Errorf("Retry-After %q, want %q", got, tc.want)
			}
		})
	}
}

// TestAccountsHostilePromptRestsNoAccount: one client's prompt cannot
// take the pool down. A service that echoes the prompt in a refusal
// (whole, cut, in capitals) makes no account rest, though the prompt
// says "points": the client gets the service's refusal, health stays 200
// and the next ordinary request is served at its first attempt. A
// Cloudflare page for a word of the prompt rests the first account that
// met it and no other: the second account failing the same way makes it
// the request's failure.
func TestAccountsHostilePromptRestsNoAccount(t *testing.T) {
	const prompt = "forbidden points no-enhance"
	for _, tc := range []struct {
		name, prompt string
		echo         func(string) string
		code         string
		calls, rests int
	}{
		{"echoed whole", prompt, func(p string) string { return p }, "upstream_error", 1, 0},
		{"echoed cut", prompt, func(p string) string { return p[:len("forbidden poin")] + "ts…" }, "upstream_error", 1, 0},
		{"echoed in capitals, spaces doubled", "forbidden Points\tand balance", func(p string) string {
			return strings.ReplaceAll(strings.ToUpper(p), "\t", "  ")
		}, "upstream_error", 1, 0},
		{"a Cloudflare page for a word", "a cfmarker cat", nil, "upstream_blocked", 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(hostileFake(tc.echo))
			threeAccountsWithHealth(t, up)
			before, mark := scrape(t), markLog(t)

			status, hdr, body := do(t, http.MethodPost, "/v1/images/generations", `{"model":"Z-Image","prompt":`+string(must(json.Marshal(tc.prompt)))+`}`)
			e := itWantErr(t, status, hdr, body, http.StatusBadGateway, tc.code)
			if tc.code == "upstream_error" && !strings.Contains(e.Message, "prompt contains forbidden word") {
				t.Errorf("message %q, want the service's refusal", e.Message)
			}
			if n := len(up.Calls()); n != tc.calls {
				t.Errorf("the hostile request made %d calls, want %d", n, tc.calls)
			}
			var rests float64
			for _, name := range []string{"a", "b", "c"} {
				for _, kind := range []string{kindNoPoints, kindBlocked} {
					rests += grewSince(t, before, "caddy_zimage_upstream_account_rests_total", "account", name, "reason", kind)
				}
			}
			if int(rests) != tc.rests || len(mark.find(t, "image service account rests", nil)) != tc.rests {
				t.Errorf("%v accounts rested, want %d", rests, tc.rests)
			}
			if status, _, body, _ := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusOK {
				t.Errorf("health after the hostile request: %d %s", status, body)
			}

			calls := len(up.Calls())
			if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"model":"Z-Image","prompt":"a quiet lake"}`); status != http.StatusOK {
				t.Fatalf("the next ordinary request: %d %s", status, body)
			}
			if n := len(up.Calls()) - calls; n != 1 {
				t.Errorf("the next ordinary request made %d calls, want 1: the first account it asked served it", n)
			}
		})
	}
}

// TestAccountsSuccessEndsRest: an account that answered out of points
// rests, but once it makes an image (asked while every account rests) the
// rest is over: the next request goes to it rather than to the account
// still out, and health is 200 again.
func TestAccountsSuccessEndsRest(t *testing.T) {
	var toppedUp atomic.Bool
	up := newFakeUpstream(t)
	up.setHandler(byKey(map[string]http.HandlerFunc{
		testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
			if !toppedUp.Load() {
				failWith(http.StatusForbidden, `{"success":false,"error":"Insufficient points"}`)(w, r)
				return
			}
			writeImage(w, "https://img.example.com/a.png")
		},
		testAccountKeyB: failWith(http.StatusPaymentRequired, `{"success":false,"message":"余额不足"}`),
	}))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", "health"))
	mark := markLog(t)
	for i, code := range []string{"upstream_error", "no_points"} { // a rests, then b
		status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("both out", 1700+i, ""))
		itWantErr(t, status, hdr, body, http.StatusBadGateway, code)
	}
	if status, _, body, _ := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusServiceUnavailable {
		t.Fatalf("health while both rest: %d %s", status, body)
	}

	toppedUp.Store(true)
	for i := range 3 {
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("a again", 1710+i, ""))
		if status != http.StatusOK || !strings.Contains(string(body), "img.example.com/a.png") {
			t.Fatalf("request %d after the top-up: %d, want a's image: %s", i, status, body)
		}
	}
	if status, _, body, rep := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusOK || rep.Accounts[0].Resting || !rep.Accounts[1].Resting {
		t.Errorf("health after a's image: %d %s, want 200 with b alone resting", status, body)
	}
	if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 4 || b != 2 {
		t.Errorf("calls a %d, b %d; want 4 and 2: b rests, a no more", a, b)
	}
	if l := mark.find(t, "image service account rests no more: it made an image", nil); len(l) != 1 || l[0]["account"] != "a" {
		t.Errorf("lines of a rest ended: %v, want one for a", l)
	}
}

// Retries of the image service call through a real Caddy: which failures
// are retried, how often, and that they stay within the one timeout.

// TestOpsRetries: retries happen on connection errors and 502/503/504 only,
// as many as configured (default 1), and never on other statuses, on
// success:false or after a timeout; a 429 passes Retry-After on.
func TestOpsRetries(t *testing.T) {
	ok := func(w http.ResponseWriter, r *http.Request) { writeImage(w, "https://img.example.com/retry.png") }
	hang := func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }
	for _, tc := range []struct {
		name      string
		upstream  string             // lines of the upstream block
		answers   []http.HandlerFunc // per attempt; the last repeats
		status    int
		calls     int
		code      string // the error code, when status is not 200
		retryAftr string
	}{
		{"503 once then success, default retries", "", []http.HandlerFunc{failWith(503, `{"error":"busy"}`), ok}, 200, 2, "", ""},
		{"dropped connection then success", "", []http.HandlerFunc{dropConnection, ok}, 200, 2, "", ""},
		{"always 504, default retries", "", []http.HandlerFunc{failWith(504, `{}`)}, 502, 2, "upstream_error", ""},
		{"always 502, retries 2", "retries 2", []http.HandlerFunc{failWith(502, `{}`)}, 502, 3, "upstream_error", ""},
		{"always 503, retries 0", "retries 0", []http.HandlerFunc{failWith(503, `{}`)}, 502, 1, "upstream_error", ""},
		{"always 500, retries 2", "retries 2", []http.HandlerFunc{failWith(500, `{"error":"boom"}`)}, 502, 1, "upstream_error", ""},
		{"400, retries 2", "retries 2", []http.HandlerFunc{failWith(400, `{"message":"bad prompt"}`)}, 502, 1, "upstream_error", ""},
		{"429 with Retry-After, retries 2", "retries 2", []http.HandlerFunc{failWith(429, `{"error":"slow down"}`, "Retry-After", "7")}, 429, 1, "rate_limit_exceeded", "7"},
		{"success false, retries 2", "retries 2", []http.HandlerFunc{failWith(200, `{"success":false,"error":"nsfw"}`)}, 502, 1, "upstream_error", ""},
		{"timeout, retries 2", "retries 2\n\t\ttimeout 500ms", []http.HandlerFunc{hang}, 504, 1, "upstream_timeout", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			var mu sync.Mutex
			attempt := 0
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				h := tc.answers[min(attempt, len(tc.answers)-1)]
				attempt++
				mu.Unlock()
				h(w, r)
			})
			upstream := tc.upstream
			if !strings.Contains(upstream, "timeout") {
				upstream += "\n\t\ttimeout 10s"
			}
			startCaddy(t, opsSite(up.endpoint(), nil, upstream, ""))

			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("retry me", 41, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if tc.code != "" {
				if e := apiErr(t, body); e.Code != tc.code {
					t.Errorf("error code %q, want %q", e.Code, tc.code)
				}
			}
			if tc.retryAftr != "" && hdr.Get("Retry-After") != tc.retryAftr {
				t.Errorf("Retry-After %q, want %q", hdr.Get("Retry-After"), tc.retryAftr)
			}
			if n := len(up.Calls()); n != tc.calls {
				t.Errorf("%d upstream attempts, want %d", n, tc.calls)
			}
		})
	}
}

// TestOpsRetriesStayWithinTimeout: retries and their backoff (250 ms,
// 500 ms, 1 s, … each ±50%) fit inside the one overall timeout: with
// retries 10 and timeout 2s an upstream that always answers 503 is tried
// three to five times (at least two on a slow machine), never eleven, and
// the client gets the upstream's failure.
func TestOpsRetriesStayWithinTimeout(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(failWith(503, `{"error":"down"}`))
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 2s\n\t\tretries 10", ""))
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("retry within the timeout", 45, ""))
	if status != http.StatusBadGateway && status != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want 502 or 504: %s", status, body)
	}
	if n := len(up.Calls()); n < 2 || n > 5 {
		t.Errorf("%d attempts within 2s, want 2 to 5", n)
	}
}

// TestOpsRetriesRefusedConnection: a refused connection is retried: with
// retries 2 there are three attempts, each counted as a "refused" upstream
// error and the first two logged as retried, then 502.
func TestOpsRetriesRefusedConnection(t *testing.T) {
	startCaddy(t, opsSite(closedURL(t), nil, "timeout 10s\n\t\tretries 2", "")+"\nmetrics /metrics")
	mark := markLog(t)
	before := scrape(t)
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody home", 51, ""))
	if status != http.StatusBadGateway {
		t.Fatalf("status %d, want 502: %s", status, body)
	}
	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "refused"); d != 3 {
		t.Errorf("refused errors counted: %v, want 3 (one per attempt)", d)
	}
	retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool { return l["kind"] == "refused" })
	final := mark.find(t, "generation", withSeed(51))
	if len(retried) != 2 || len(final) != 1 || final[0]["failure"] != "refused" || final[0]["status"] != float64(502) {
		t.Errorf("want two retry warnings and one generation line with failure refused; got %d and %v", len(retried), final)
	}
}
