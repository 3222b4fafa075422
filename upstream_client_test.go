package zimage

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// The answer is read into a pooled buffer of 4 KiB, and past it up to
// maxUpstreamBody: a success of any size up to the limit is read whole,
// padding on either side of the buffer's edge, and one byte more fails.
func TestUnitImageClientAnswerSizes(t *testing.T) {
	const head, tail = `{"success":true,"data":{"image_url":"https://img.example/x.png","model_name":"Z-Image","pad":"`, `"}}`
	for _, size := range []int{len(head) + len(tail), 4<<10 - 1, 4 << 10, 4<<10 + 1, 100 << 10, maxUpstreamBody, maxUpstreamBody + 1} {
		body := head + strings.Repeat("a", size-len(head)-len(tail)) + tail
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = w.Write([]byte(body))
		}))
		ic, err := newImageClient(srv.URL+"/api/v1/generate_image", time.Minute, newTransport())
		if err != nil {
			t.Fatal(err)
		}
		// twice: the second call reads into the buffer the first gave back
		for range 2 {
			res, ue := ic.generate(context.Background(), "sd-key", upstreamRequest{Prompt: "a cat"}, "")
			if size > maxUpstreamBody {
				if ue == nil || ue.kind != kindBadResponse || !strings.Contains(ue.message, "larger than") {
					t.Errorf("answer of %d bytes: %+v, %+v; want bad_response, larger than the limit", size, res, ue)
				}
				continue
			}
			if ue != nil || res.imageURL != "https://img.example/x.png" || res.info.modelName != "Z-Image" {
				t.Errorf("answer of %d bytes: %+v, %+v; want the image", size, res, ue)
			}
		}
		ic.closeIdle()
		srv.Close()
	}
}
