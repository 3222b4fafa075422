package zimage

// Points (docs/design.md#points): what the service reports is counted and
// logged, and accounts out of points rest until every one does.

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// TestAccountsPoints (docs/design.md#points): the points each account's answers
// report (numbers for a, numeric strings for b) set the gauge and add to
// the counter per account; the generation line carries the account, the
// points, image_id and model_name; low_points warns once per crossing.
func TestAccountsPoints(t *testing.T) {
	up := newFakeUpstream(t)
	var mu sync.Mutex
	aRemaining := []int{150, 95, 90, 120, 80} // crosses below 100 twice
	aN, bN := 0, 0
	answer := func(w http.ResponseWriter, data string) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"success":true,"data":{"image_url":"https://img.example.com/p.png",%s}}`, data)
	}
	up.setHandler(byKey(map[string]http.HandlerFunc{
		testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			rem := aRemaining[aN]
			aN++
			mu.Unlock()
			answer(w, fmt.Sprintf(`"points_used":5,"remaining_points":%d,"image_id":%d,"model_name":"Z-Image Turbo"`, rem, 1000+aN))
		},
		testAccountKeyB: func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			bN++
			n := bN
			mu.Unlock()
			answer(w, fmt.Sprintf(`"points_used":"2","remaining_points":"%d.5","image_id":"img-b-%d"`, 1000-n, n))
		},
	}))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA, "low_points 100")+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
	before, mark := scrape(t), markLog(t)
	for i := range 10 { // in turn: a b a b …
		if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("points", 1100+i, "")); status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
	}
	after := scrape(t)
	for _, tc := range []struct {
		name    string
		account string
		want    float64
		delta   bool
	}{
		{"caddy_zimage_upstream_points_used_total", "a", 25, true},
		{"caddy_zimage_upstream_points_used_total", "b", 10, true},
		{"caddy_zimage_upstream_points_remaining", "a", 80, false},
		{"caddy_zimage_upstream_points_remaining", "b", 995.5, false},
	} {
		got := after.get(tc.name, "account", tc.account)
		if tc.delta {
			got = after.delta(before, tc.name, "account", tc.account)
		}
		if got != tc.want {
			t.Errorf("%s{account=%s} = %v, want %v", tc.name, tc.account, got, tc.want)
		}
	}
	if after.types["caddy_zimage_upstream_points_remaining"] != "gauge" || after.types["caddy_zimage_upstream_points_used_total"] != "counter" {
		t.Errorf("types %q %q", after.types["caddy_zimage_upstream_points_remaining"], after.types["caddy_zimage_upstream_points_used_total"])
	}

	warns := mark.find(t, "image service account is low on points", func(l map[string]any) bool {
		return l["level"] == "warn" && l["account"] == "a" && l["low_points"] == float64(100)
	})
	if len(warns) != 2 || warns[0]["remaining_points"] != float64(95) || warns[1]["remaining_points"] != float64(80) {
		t.Errorf("low points warnings %v, want two: at 95 and at 80", warns)
	}
	lines := generationLines(t, mark, 200)
	if len(lines) != 10 {
		t.Fatalf("%d generation lines, want 10", len(lines))
	}
	first, second := lines[0], lines[1]
	for k, want := range map[string]any{"account": "a", "points_used": float64(5), "remaining_points": float64(150), "image_id": "1001", "model_name": "Z-Image Turbo", "client": "default"} {
		if first[k] != want {
			t.Errorf("first line %s = %v, want %v", k, first[k], want)
		}
	}
	for k, want := range map[string]any{"account": "b", "points_used": float64(2), "remaining_points": 999.5, "image_id": "img-b-1"} {
		if second[k] != want {
			t.Errorf("second line %s = %v, want %v", k, second[k], want)
		}
	}
	if _, ok := second["model_name"]; ok {
		t.Errorf("model_name on a line whose answer had none: %v", second)
	}
}

// TestAccountsOutOfPoints (docs/design.md#failover-and-rests): an answer that
// says an account has no points left fails over at once and rests the
// account for points_rest, counted as kind no_points; a success whose
// remaining_points is below its points_used rests the account before it
// is asked again; the client hears of no_points only when every account
// is out: a 502 saying so, without Retry-After.
func TestAccountsOutOfPoints(t *testing.T) {
	noPoints := failWith(403, `{"success":false,"error":"Insufficient points: 0 left"}`)
	t.Run("one out: failover and its rest", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: noPoints}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA, "points_rest 45m")+accountBlock("b", testAccountKeyB),
			"timeout 10s\n\t\tpoints_rest 2h", ""))
		before, mark := scrape(t), markLog(t)
		for i := range 3 {
			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("out of points?", 1400+i, ""))
			if status != http.StatusOK || !strings.Contains(string(body), "img.example.com/b.png") {
				t.Fatalf("request %d: status %d, want b's image: %s", i, status, body)
			}
		}
		if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 1 || b != 3 {
			t.Errorf("calls a %d, b %d; want 1 and 3 (a rests)", a, b)
		}
		after := scrape(t)
		if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "no_points"); d != 1 {
			t.Errorf("no_points errors counted %v, want 1", d)
		}
		if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", "a", "reason", "no_points"); d != 1 {
			t.Errorf("no_points rests of a counted %v, want 1", d)
		}
		if l := mark.find(t, "image service account rests", nil); len(l) != 1 || l[0]["account"] != "a" || l[0]["rest"] != float64(45*60) {
			t.Errorf("rest lines %v, want one of a for its points_rest, 2700s", l)
		}
	})

	t.Run("all out: 502 no_points once every account rests", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{
			testAccountKeyA: noPoints,
			testAccountKeyB: failWith(402, `{"success":false,"message":"余额不足"}`),
		}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
		before, mark := scrape(t), markLog(t)
		// the first rests a, and b failing the same way makes it the
		// request's failure (b does not rest for it); the second rests b;
		// the third, while both rest, still asks one (a, in turn)
		for i, code := range []string{"upstream_error", "no_points", "no_points"} {
			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody has points", 1500+i, ""))
			if status != http.StatusBadGateway {
				t.Fatalf("request %d: status %d, want 502: %s", i, status, body)
			}
			e := apiErr(t, body)
			if e.Code != code || code == "no_points" && !strings.Contains(e.Message, "accounts have no points left") || code != "no_points" && !strings.Contains(e.Message, "余额不足") {
				t.Errorf("request %d: error %+v, want code %s", i, e, code)
			}
			if ra := hdr.Get("Retry-After"); ra != "" {
				t.Errorf("request %d: Retry-After %q on a 502 no_points", i, ra)
			}
		}
		if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 2 || b != 2 {
			t.Errorf("calls a %d, b %d; want 2 and 2", a, b)
		}
		if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", "no_points"); d != 4 {
			t.Errorf("no_points errors counted %v, want 4 (one per call)", d)
		}
		for _, name := range []string{"a", "b"} {
			if l := mark.find(t, "image service account rests", func(l map[string]any) bool {
				return l["reason"] == kindNoPoints && l["account"] == name && l["rest"] == float64(3600)
			}); len(l) == 0 {
				t.Errorf("no no_points rest line for %s", name)
			}
		}
	})

	t.Run("one out, the other rests after a 429: not no_points", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{
			testAccountKeyA: failWith(429, `{"error":"slow"}`, "Retry-After", "60"),
			testAccountKeyB: noPoints,
		}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
		// a rests after its 429 (b answers no points: out)
		do(t, http.MethodPost, "/v1/chat/completions", chatJSON("a rests", 1550, ""))
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("b is out, a rests", 1551, ""))
		if e := apiErr(t, body); status == http.StatusBadGateway && e.Code == "no_points" {
			t.Errorf("no_points while account a only rests after a 429: %s", body)
		}
	})

	t.Run("remaining below used: rests before it is asked again", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"success":true,"data":{"image_url":"https://img.example.com/a.png","points_used":5,"remaining_points":"3"}}`)
		}}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s\n\t\tpoints_rest 90m", ""))
		before, mark := scrape(t), markLog(t)
		want := []string{"a", "b", "b", "b"} // in turn a, b, a, b without the rest
		for i, w := range want {
			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("last points", 1600+i, ""))
			if status != http.StatusOK || !strings.Contains(string(body), "img.example.com/"+w+".png") {
				t.Fatalf("request %d: status %d, want %s's image: %s", i, status, w, body)
			}
		}
		if a := up.keyCalls(testAccountKeyA); a != 1 {
			t.Errorf("a was asked %d times, want once: it rests after its last points", a)
		}
		rests := mark.find(t, "image service account rests", func(l map[string]any) bool {
			return l["account"] == "a" && l["reason"] == kindNoPoints && l["rest"] == float64(90*60) &&
				l["remaining_points"] == float64(3) && l["points_used"] == float64(5)
		})
		if len(rests) != 1 {
			t.Errorf("%d rest lines for a's last points, want 1", len(rests))
		}
		if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", "no_points"); d != 0 {
			t.Errorf("no_points errors counted %v for a success", d)
		}
	})
}

// TestAccountsAllOutRestInNRequests: three accounts all truly out of
// points (saying so in three ways) are all resting after three requests,
// each of which rests one account; the first two get the service's
// answer, and only the third, when every account rests, no_points.
func TestAccountsAllOutRestInNRequests(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(byKey(map[string]http.HandlerFunc{
		testAccountKeyA: failWith(http.StatusForbidden, `{"success":false,"error":"Insufficient points: 0 left"}`),
		testAccountKeyB: failWith(http.StatusPaymentRequired, `{"success":false,"message":"payment required"}`),
		testAccountKeyC: failWith(http.StatusOK, `{"success":false,"message":"积分不足"}`),
	}))
	threeAccountsWithHealth(t, up)
	before := scrape(t)
	for i, want := range []struct {
		code  string
		calls int
	}{{"upstream_error", 2}, {"upstream_error", 2}, {"no_points", 1}} {
		calls := len(up.Calls())
		status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody has points", 1800+i, ""))
		itWantErr(t, status, hdr, body, http.StatusBadGateway, want.code)
		if n := len(up.Calls()) - calls; n != want.calls {
			t.Errorf("request %d made %d calls, want %d", i+1, n, want.calls)
		}
	}
	after := scrape(t)
	for _, name := range []string{"a", "b", "c"} {
		if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", name, "reason", kindNoPoints); d != 1 {
			t.Errorf("account %s rested %v times, want once", name, d)
		}
	}
	if status, _, body, _ := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusServiceUnavailable {
		t.Errorf("health with every account out: %d %s", status, body)
	}
}
