package zimage

import (
	"net/http"
	"strings"
	"testing"
)

func TestSmokeChat(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, ""))
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"Z-Image","messages":[{"role":"user","content":"a cat"}]}`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	if c := chatContent(t, body); !strings.Contains(c, "https://img.example.com/") {
		t.Fatalf("content %q", c)
	}
	if calls := up.Calls(); len(calls) != 1 || calls[0].Auth != "Bearer "+testSDKey {
		t.Fatalf("calls %+v", calls)
	}
}
