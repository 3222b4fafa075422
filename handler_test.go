package zimage

import "testing"

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
