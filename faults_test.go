package zimage

// An image service that trickles its answer, through a real Caddy: the
// upstream timeout bounds the whole call, the client gets a well-formed
// answer, the connection is released and nothing panics.

import (
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFaultUpstreamTrickle: an image service that sends its headers and the
// start of a success, then one byte every 100ms for ever. The upstream
// timeout bounds the whole call, not the time between bytes: the client
// gets a 504 and the gateway drops the connection, which the fake sees.
func TestFaultUpstreamTrickle(t *testing.T) {
	up := newFakeUpstream(t)
	stop := faultStop(t)
	var once sync.Once
	released := make(chan struct{})
	var how atomic.Value
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		defer faultSignal(&once, released)
		rc := http.NewResponseController(w)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"success":true,"data":{"image_url":"https://img.example.com/`)
		if err := rc.Flush(); err != nil {
			how.Store("first write failed")
			return
		}
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-r.Context().Done():
				how.Store("released")
				return
			case <-stop:
				how.Store("still trickling when the test ended")
				return
			case <-tick.C:
			}
			if _, err := w.Write([]byte("a")); err != nil {
				how.Store("released")
				return
			}
			if err := rc.Flush(); err != nil {
				how.Store("released")
				return
			}
		}
	})
	mark := faultLogMark(t)
	startCaddy(t, itSite(up, itConfig{upstream: "timeout 1s"}))

	status, hdr, body := itPost(t, itChatBody(t, "a cat"))
	e := itWantErr(t, status, hdr, body, http.StatusGatewayTimeout, "upstream_timeout")
	if e.Type != "upstream_error" {
		t.Errorf("type %q", e.Type)
	}
	faultAwait(t, released, "the image service's connection to be released")
	if got := how.Load(); got != "released" {
		t.Errorf("the fake image service ended with %v, want its connection released by the gateway", got)
	}
	if n := len(up.Calls()); n != 1 {
		t.Errorf("%d calls to the image service, want 1 (a timeout is not retried)", n)
	}
	faultNoPanic(t, mark)
}
