package zimage

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestUnitParseRoute(t *testing.T) {
	for _, tc := range []struct {
		path string
		want route
		id   string
	}{
		{"/v1/models", routeModels, ""},
		{"/models", routeModels, ""},
		{"/v1/models/", routeModels, ""},
		{"/v1/models/Z-Image", routeModel, "Z-Image"},
		{"/models/dall-e-3", routeModel, "dall-e-3"},
		{"/v1/chat/completions", routeChat, ""},
		{"/chat/completions", routeChat, ""},
		{"/v1//chat/completions", routeChat, ""},
		{"//v1///images/generations", routeImages, ""},
		{"/images/generations", routeImages, ""},
		{"/v1/zimage-demo/64x64.png", routeDemoImage, "64x64.png"},
		{"/v1/embeddings", routeUnknown, ""},
		{"/v1", routeUnknown, ""},
		{"/v1beta/models", routeNone, ""},
		{"/", routeNone, ""},
		{"/index.html", routeNone, ""},
		{"/api/chat/completions", routeNone, ""},
	} {
		got, id := parseRoute(tc.path)
		if got != tc.want || id != tc.id {
			t.Errorf("parseRoute(%q) = %d, %q; want %d, %q", tc.path, got, id, tc.want, tc.id)
		}
	}
}

// TestHandlerNoAuthCrossSite: with no_auth, a JSON endpoint refuses the
// body types a browser sends from any page without a preflight; with keys
// every type is accepted as before (issue 8, item 9).
func TestHandlerNoAuthCrossSite(t *testing.T) {
	up := newFakeUpstream(t)
	body := `{"prompt":"a cat"}`
	for _, tc := range []struct {
		name, ct string
		noAuth   bool
		want     int
	}{
		{"no_auth text/plain", "text/plain;charset=UTF-8", true, http.StatusUnsupportedMediaType},
		{"no_auth form", "application/x-www-form-urlencoded", true, http.StatusUnsupportedMediaType},
		{"no_auth multipart", "multipart/form-data; boundary=x", true, http.StatusUnsupportedMediaType},
		{"no_auth no type", "", true, http.StatusUnsupportedMediaType},
		{"no_auth json", "application/json", true, http.StatusOK},
		{"no_auth json charset", "application/json; charset=utf-8", true, http.StatusOK},
		{"keys text/plain", "text/plain", false, http.StatusOK},
		{"keys no type", "", false, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			site := gatewaySite(up, nil, "")
			if tc.noAuth {
				site = strings.Replace(site, "api_key "+testClientKey, "no_auth", 1)
			}
			startCaddy(t, site)
			for _, path := range []string{"/v1/chat/completions", "/v1/images/generations"} {
				req, _ := http.NewRequest(http.MethodPost, baseURL+path, strings.NewReader(body))
				if tc.ct != "" {
					req.Header.Set("Content-Type", tc.ct)
				}
				if !tc.noAuth {
					req.Header.Set("Authorization", "Bearer "+testClientKey)
				}
				resp, err := testClient(10 * time.Second).Do(req)
				if err != nil {
					t.Fatal(err)
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != tc.want {
					t.Fatalf("%s: status %d, want %d: %s", path, resp.StatusCode, tc.want, raw)
				}
				if tc.want == http.StatusUnsupportedMediaType {
					if e := apiErr(t, raw); e.Code != "unsupported_media_type" || !strings.Contains(e.Message, "application/json") {
						t.Errorf("error %+v", e)
					}
				}
			}
		})
	}
}
