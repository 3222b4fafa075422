package zimage

// The official Go SDK against the gateway (docs/design.md#how-it-is-tested):
// models and non-streaming chat, with the base URL written both with and
// without /v1, and the SDK's typed errors for the gateway's error answers.

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// sdkFor is an SDK client for the test site; its HTTP client records
// responses for the secret scan, and retries are off so faults stay fast.
func sdkFor(base, key string) openai.Client {
	return openai.NewClient(
		option.WithBaseURL(base),
		option.WithAPIKey(key),
		option.WithHTTPClient(testClient(30*time.Second)),
		option.WithMaxRetries(0),
	)
}

func TestSDKModelsAndChat(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{gateway: itTwoModels}))
	for _, base := range []string{baseURL + "/v1/", baseURL + "/"} {
		t.Run(base, func(t *testing.T) {
			ctx := context.Background()
			client := sdkFor(base, testClientKey)

			page, err := client.Models.List(ctx)
			if err != nil {
				t.Fatalf("Models.List: %v", err)
			}
			if len(page.Data) != 2 || page.Data[0].ID != "Z-Image" || page.Data[1].ID != "Z-Turbo" {
				t.Fatalf("Models.List data %+v", page.Data)
			}
			for _, m := range page.Data {
				if m.OwnedBy != "sd-exacg-gateway" || string(m.Object) != "model" || m.Created <= 0 {
					t.Errorf("model %+v", m)
				}
			}

			m, err := client.Models.Get(ctx, "dall-e-3")
			if err != nil {
				t.Fatalf("Models.Get(alias): %v", err)
			}
			if m.ID != "Z-Image" || m.OwnedBy != "sd-exacg-gateway" {
				t.Errorf("Models.Get(alias) = %+v", m)
			}

			n := len(up.Calls())
			cc, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
				Model: "dall-e-3",
				Messages: []openai.ChatCompletionMessageParamUnion{
					openai.SystemMessage("You draw pictures."),
					openai.UserMessage("a red fox in the snow, ratio 16:9"),
				},
				Seed: openai.Int(77),
			})
			if err != nil {
				t.Fatalf("Chat.Completions.New: %v", err)
			}
			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != "a red fox in the snow" || c.Body.Seed != 77 || c.Body.Width != 2048 || c.Body.Height != 1152 {
				t.Errorf("upstream call %+v", c.Body)
			}
			want := itMarkdown("a red fox in the snow", itImageURL(77),
				itPlain("a red fox in the snow, ratio 16:9"), "16:9", 2048, 1152)
			if len(cc.Choices) != 1 || cc.Choices[0].Message.Content != want {
				t.Fatalf("choices %+v, want one whose content is\n%q", cc.Choices, want)
			}
			if cc.Model != "dall-e-3" || !strings.HasPrefix(cc.ID, "chatcmpl-") || cc.Choices[0].FinishReason != "stop" ||
				string(cc.Choices[0].Message.Role) != "assistant" {
				t.Errorf("completion id %q model %q finish %q role %q", cc.ID, cc.Model, cc.Choices[0].FinishReason, cc.Choices[0].Message.Role)
			}
		})
	}
}

func TestSDKErrors(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	chat := func(c openai.Client, model string) error {
		_, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model:    model,
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("a cat")},
		})
		return err
	}
	good := sdkFor(baseURL+"/v1/", testClientKey)
	for _, tc := range []struct {
		name     string
		upstream http.HandlerFunc
		call     func() error
		status   int
		code     string
	}{
		{"wrong key on models", nil, func() error {
			bad := sdkFor(baseURL+"/v1/", "sk-wrong")
			_, err := bad.Models.List(context.Background())
			return err
		}, 401, "invalid_api_key"},
		{"wrong key on chat", nil, func() error { return chat(sdkFor(baseURL+"/", "sk-wrong"), "Z-Image") }, 401, "invalid_api_key"},
		{"unknown model on chat", nil, func() error { return chat(good, "gpt-4o") }, 404, "model_not_found"},
		{"unknown model on get", nil, func() error {
			_, err := good.Models.Get(context.Background(), "gpt-4o")
			return err
		}, 404, "model_not_found"},
		{"upstream 500", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, `{"error":"sampler crashed"}`)
		}, func() error { return chat(good, "Z-Image") }, 502, "upstream_error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.setHandler(tc.upstream)
			err := tc.call()
			var apiErr *openai.Error
			if !errors.As(err, &apiErr) {
				t.Fatalf("error %v (%T), want *openai.Error", err, err)
			}
			if apiErr.StatusCode != tc.status || apiErr.Code != tc.code || apiErr.Message == "" {
				t.Errorf("status %d code %q message %q, want %d %q", apiErr.StatusCode, apiErr.Code, apiErr.Message, tc.status, tc.code)
			}
		})
	}
}
