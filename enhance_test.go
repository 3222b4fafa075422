package zimage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Parse robustly (fences, <think>, prose), ignore a ratio
// outside the six, fail on an empty prompt or no JSON.
func TestUnitParseEnhanced(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in string
		prompt   string
		ratio    string
		wantErr  bool
	}{
		{"plain JSON", `{"prompt":"a cat on a roof","aspect_ratio":"16:9"}`, "a cat on a roof", "16:9", false},
		{"each ratio 1:1", `{"prompt":"p","aspect_ratio":"1:1"}`, "p", "1:1", false},
		{"each ratio 1:2", `{"prompt":"p","aspect_ratio":"1:2"}`, "p", "1:2", false},
		{"each ratio 3:2", `{"prompt":"p","aspect_ratio":"3:2"}`, "p", "3:2", false},
		{"each ratio 3:4", `{"prompt":"p","aspect_ratio":"3:4"}`, "p", "3:4", false},
		{"each ratio 9:16", `{"prompt":"p","aspect_ratio":"9:16"}`, "p", "9:16", false},
		{"prompt trimmed", `{"prompt":"  a cat \n","aspect_ratio":"1:1"}`, "a cat", "1:1", false},
		{"ratio with spaces", `{"prompt":"p","aspect_ratio":" 9:16 "}`, "p", "9:16", false},
		{"full-width colon ratio", `{"prompt":"p","aspect_ratio":"16：9"}`, "p", "16:9", false},
		{"no ratio field", `{"prompt":"a cat"}`, "a cat", "", false},
		{"extra fields", `{"reasoning":"x","prompt":"a cat","aspect_ratio":"3:4","style":{"a":1}}`, "a cat", "3:4", false},
		{"json fence", "```json\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"3:2\"}\n```", "a cat", "3:2", false},
		{"bare fence", "```\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"1:2\"}\n```", "a cat", "1:2", false},
		{"think before", "<think>the user wants {a cat}; maybe {\"prompt\":\"wrong\"}</think>\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"16:9\"}", "a cat", "16:9", false},
		{"THINK upper case", "<THINK>{\"prompt\":\"wrong\"}</THINK>{\"prompt\":\"a cat\"}", "a cat", "", false},
		{"two think blocks", "<think>a</think>{\"prompt\":\"a cat\"}<think>{\"prompt\":\"wrong\"}</think>", "a cat", "", false},
		{"think then fence", "<think>hmm</think>\n```json\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"9:16\"}\n```", "a cat", "9:16", false},
		{"unclosed think after answer", "{\"prompt\":\"a cat\"}\n<think>{\"prompt\":\"wrong\"}", "a cat", "", false},
		{"unclosed think hides everything", "<think>{\"prompt\":\"wrong\",\"aspect_ratio\":\"1:1\"}", "", "", true},
		{"non-ASCII before think", "İİİİ<think>{\"prompt\":\"wrong\"}</think>{\"prompt\":\"a cat\"}", "a cat", "", false},
		{"letters whose lower case is longer before think", "ȺȺȺȺ<think>{\"prompt\":\"wrong\"}</think>{\"prompt\":\"a cat\"}", "a cat", "", false},
		{"invalid UTF-8 before think", "\xff\xfe<think>{\"prompt\":\"wrong\"}</think>{\"prompt\":\"a cat\"}", "a cat", "", false},
		{"prose around", "Sure! Here is your prompt:\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"1:1\"}\nEnjoy.", "a cat", "1:1", false},
		{"nested braces in prose before", "I considered {a {nested} idea} and {\"x\": {\"y\": 1}} first. {\"prompt\":\"a cat\",\"aspect_ratio\":\"3:4\"}", "a cat", "3:4", false},
		{"object without prompt before", "{\"note\":\"draft\"} {\"prompt\":\"a cat\"}", "a cat", "", false},
		{"braces inside the prompt", `{"prompt":"a sign that says {hello}","aspect_ratio":"1:1"}`, "a sign that says {hello}", "1:1", false},
		{"CJK kept", `{"prompt":"a shop sign reading \"欢迎光临\"","aspect_ratio":"16:9"}`, `a shop sign reading "欢迎光临"`, "16:9", false},
		{"ratio 4:3 ignored", `{"prompt":"a cat","aspect_ratio":"4:3"}`, "a cat", "", false},
		{"ratio 21:9 ignored", `{"prompt":"a cat","aspect_ratio":"21:9"}`, "a cat", "", false},
		{"ratio number ignored", `{"prompt":"a cat","aspect_ratio":7}`, "a cat", "", false},
		{"ratio null", `{"prompt":"a cat","aspect_ratio":null}`, "a cat", "", false},
		{"ratio words ignored", `{"prompt":"a cat","aspect_ratio":"landscape"}`, "a cat", "", false},
		{"empty prompt", `{"prompt":"","aspect_ratio":"1:1"}`, "", "", true},
		{"blank prompt", `{"prompt":"   ","aspect_ratio":"1:1"}`, "", "", true},
		{"prompt not a string", `{"prompt":42}`, "", "", true},
		{"no JSON", "I cannot help with that.", "", "", true},
		{"empty", "", "", "", true},
		{"truncated JSON", `{"prompt":"a cat`, "", "", true},
		{"array not object", `["a cat"]`, "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseEnhanced(tc.in)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("parseEnhanced(%q) = %+v, want an error", tc.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseEnhanced(%q): %v", tc.in, err)
			}
			if got.prompt != tc.prompt || got.ratio != tc.ratio {
				t.Fatalf("parseEnhanced(%q) = {%q, %q}, want {%q, %q}", tc.in, got.prompt, got.ratio, tc.prompt, tc.ratio)
			}
		})
	}
}

// The built-in system prompt asks for what docs/design.md#the-prompt lists.
func TestUnitDefaultSystemPrompt(t *testing.T) {
	t.Parallel()
	for _, want := range []string{
		"JSON", `"prompt"`, `"aspect_ratio"`, "30", "100", "English", "Stable Diffusion",
		"verbatim", "original language", "1:1", "1:2", "3:2", "3:4", "16:9", "9:16",
	} {
		if !strings.Contains(defaultSystemPrompt, want) {
			t.Errorf("the default system prompt does not mention %q", want)
		}
	}
}

// unitLLMRecord is what a fake LLM saw of one request.
type unitLLMRecord struct {
	method, path, auth, contentType string
	body                            map[string]any
}

// unitLLM is an httptest LLM that records requests and answers with
// handler (which defaults to a chat completion whose content is content).
func unitLLM(t *testing.T, content string, handler http.HandlerFunc) (*httptest.Server, func() []unitLLMRecord) {
	t.Helper()
	var mu sync.Mutex
	var recs []unitLLMRecord
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		rec := unitLLMRecord{method: r.Method, path: r.URL.Path, auth: r.Header.Get("Authorization"), contentType: r.Header.Get("Content-Type")}
		_ = json.Unmarshal(raw, &rec.body)
		mu.Lock()
		recs = append(recs, rec)
		mu.Unlock()
		if handler != nil {
			handler(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"id": "chatcmpl-x", "object": "chat.completion",
			"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
				"message": map[string]any{"role": "assistant", "content": content}}},
		})
	}))
	t.Cleanup(srv.Close)
	return srv, func() []unitLLMRecord {
		mu.Lock()
		defer mu.Unlock()
		return append([]unitLLMRecord(nil), recs...)
	}
}

// One POST {base_url}/chat/completions with the bearer key,
// the model, a system and a user message and temperature 0.7.
func TestUnitEnhanceRequest(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		base        string // appended to the server URL
		locked      string
		llmRatio    string
		wantRatio   string
		wantLockMsg bool
	}{
		{"free ratio", "/v1", "", "9:16", "9:16", false},
		{"base with trailing slash", "/v1/", "", "3:2", "3:2", false},
		{"locked ratio overrides the LLM", "/v1", "16:9", "9:16", "16:9", true},
		{"locked ratio when the LLM gives none", "/v1", "3:4", "", "3:4", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			content := `{"prompt":"a fluffy cat on a sunny roof","aspect_ratio":null}`
			if tc.llmRatio != "" {
				content = fmt.Sprintf(`{"prompt":"a fluffy cat on a sunny roof","aspect_ratio":%q}`, tc.llmRatio)
			}
			srv, records := unitLLM(t, content, nil)
			const system = "You write prompts."
			e := newEnhancer(srv.URL+tc.base, testLLMKey, "test-model", system, 5*time.Second)
			out, err := e.enhance(context.Background(), "一只猫", tc.locked)
			if err != nil {
				t.Fatal(err)
			}
			if out.prompt != "a fluffy cat on a sunny roof" || out.ratio != tc.wantRatio {
				t.Fatalf("enhance = %+v, want prompt from the LLM and ratio %q", out, tc.wantRatio)
			}

			recs := records()
			if len(recs) != 1 {
				t.Fatalf("the LLM got %d requests, want 1", len(recs))
			}
			r := recs[0]
			if r.method != http.MethodPost || r.path != "/v1/chat/completions" {
				t.Errorf("request %s %s, want POST /v1/chat/completions", r.method, r.path)
			}
			if r.auth != "Bearer "+testLLMKey {
				t.Errorf("Authorization %q, want the bearer LLM key", r.auth)
			}
			if r.contentType != "application/json" {
				t.Errorf("Content-Type %q, want application/json", r.contentType)
			}
			keys := make([]string, 0, len(r.body))
			for k := range r.body {
				keys = append(keys, k)
			}
			if len(keys) != 3 || r.body["model"] != "test-model" || r.body["temperature"] != 0.7 {
				t.Errorf("body %v, want exactly model test-model, messages, temperature 0.7", r.body)
			}
			msgs, _ := r.body["messages"].([]any)
			if len(msgs) != 2 {
				t.Fatalf("messages %v, want system and user", r.body["messages"])
			}
			sys, _ := msgs[0].(map[string]any)
			user, _ := msgs[1].(map[string]any)
			if !reflect.DeepEqual(user, map[string]any{"role": "user", "content": "一只猫"}) {
				t.Errorf("user message %v, want the prompt as content", user)
			}
			if sys["role"] != "system" || len(sys) != 2 {
				t.Fatalf("system message %v", sys)
			}
			sysText, _ := sys["content"].(string)
			if !strings.HasPrefix(sysText, system) {
				t.Errorf("system message %q does not start with the configured prompt", sysText)
			}
			mentionsLock := strings.Contains(sysText, "locked") && strings.Contains(sysText, `"`+tc.locked+`"`)
			if tc.wantLockMsg != mentionsLock {
				t.Errorf("system message %q: mentions the lock %v, want %v", sysText, mentionsLock, tc.wantLockMsg)
			}
			if !tc.wantLockMsg && sysText != system {
				t.Errorf("system message %q, want exactly the configured prompt", sysText)
			}
		})
	}
}

// Every LLM failure is an error (the caller then degrades
// silently), and no error message carries the key.
func TestUnitEnhanceErrors(t *testing.T) {
	t.Parallel()
	answer := func(status int, body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			_, _ = io.WriteString(w, body)
		}
	}
	valid := `{"choices":[{"message":{"role":"assistant","content":"{\"prompt\":\"a cat\"}"}}]}`
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		wantMsg string
	}{
		{"500 with a valid body", answer(http.StatusInternalServerError, valid), "status 500"},
		{"401", answer(http.StatusUnauthorized, `{"error":{"message":"bad key"}}`), "status 401"},
		{"302 is not followed", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		}, "redirect"},
		{"garbage JSON", answer(http.StatusOK, `<html>oops</html>`), "decoding"},
		{"no choices", answer(http.StatusOK, `{"choices":[]}`), "no choices"},
		{"content without JSON", answer(http.StatusOK, `{"choices":[{"message":{"content":"I refuse."}}]}`), "no JSON object"},
		{"empty enhanced prompt", answer(http.StatusOK, `{"choices":[{"message":{"content":"{\"prompt\":\"\"}"}}]}`), "no JSON object"},
		{"oversized body", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			// valid JSON, only too long: the limit alone must reject it
			_, _ = io.WriteString(w, `{"choices":[{"message":{"content":"{\"prompt\":\"`)
			_, _ = io.WriteString(w, strings.Repeat("a", maxLLMBody))
			_, _ = io.WriteString(w, `\"}"}}]}`)
		}, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, records := unitLLM(t, "", tc.handler)
			e := newEnhancer(srv.URL+"/v1", testLLMKey, "m", defaultSystemPrompt, 5*time.Second)
			out, err := e.enhance(context.Background(), "a cat", "")
			if err == nil {
				t.Fatalf("enhance = %+v, want an error", out)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("error %q, want it to mention %q", err, tc.wantMsg)
			}
			if strings.Contains(err.Error(), testLLMKey) {
				t.Errorf("error %q contains the LLM key", err)
			}
			if n := len(records()); n != 1 {
				t.Errorf("the LLM got %d requests, want exactly 1 (no retries, no redirect)", n)
			}
		})
	}
}

// A slow LLM is cut off at the enhancer's timeout.
func TestUnitEnhanceTimeout(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := unitLLM(t, "", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done(): // the enhancer gave up and closed the connection
		case <-release:
		}
	})
	t.Cleanup(func() { close(release) }) // runs before srv.Close
	e := newEnhancer(srv.URL+"/v1", testLLMKey, "m", defaultSystemPrompt, 50*time.Millisecond)
	_, err := e.enhance(context.Background(), "a cat", "")
	if err == nil || !strings.Contains(err.Error(), "no answer within 50ms") {
		t.Fatalf("enhance against a hanging LLM: %v, want a timeout error", err)
	}
}

// A client that leaves cancels the LLM call.
func TestUnitEnhanceCanceled(t *testing.T) {
	t.Parallel()
	arrived := make(chan struct{})
	gone := make(chan struct{})
	srv, _ := unitLLM(t, "", func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-r.Context().Done()
		close(gone)
	})
	e := newEnhancer(srv.URL+"/v1", testLLMKey, "m", defaultSystemPrompt, time.Minute)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := e.enhance(ctx, "a cat", "")
		errc <- err
	}()
	<-arrived
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("enhance with a cancelled context succeeded")
	}
	<-gone // the LLM saw the request end
}

// The Authorization header carries the LLM key: a redirect from the LLM's
// base URL must never carry it to another server (Go's client would keep
// it for the same host on another port).
func TestUnitEnhanceRedirectKeepsKey(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var seenAuth []string
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seenAuth = append(seenAuth, r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"choices":[{"message":{"content":"{\"prompt\":\"stolen\"}"}}]}`)
	}))
	t.Cleanup(other.Close)
	for _, status := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		t.Run(http.StatusText(status), func(t *testing.T) {
			srv, _ := unitLLM(t, "", func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, other.URL+"/v1/chat/completions", status)
			})
			e := newEnhancer(srv.URL+"/v1", testLLMKey, "m", defaultSystemPrompt, 5*time.Second)
			out, err := e.enhance(context.Background(), "a cat", "")
			if err == nil {
				t.Fatalf("enhance followed a redirect: %+v", out)
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	for _, a := range seenAuth {
		if strings.Contains(a, testLLMKey) {
			t.Fatalf("the redirect target received the LLM key (Authorization %q)", a)
		}
	}
	if len(seenAuth) != 0 {
		t.Fatalf("the redirect target got %d requests, want none", len(seenAuth))
	}
}

// A refused connection is an error that wraps the transport's, so the log
// line says what went wrong.
func TestUnitEnhanceRefused(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.NotFoundHandler())
	base := srv.URL + "/v1"
	srv.Close() // nothing listens there any more
	e := newEnhancer(base, testLLMKey, "m", defaultSystemPrompt, 5*time.Second)
	_, err := e.enhance(context.Background(), "a cat", "")
	if err == nil || !strings.HasPrefix(err.Error(), "enhance: ") || errors.Unwrap(err) == nil {
		t.Fatalf("enhance against a closed port: %v, want a wrapped transport error", err)
	}
}

// TestEnhanceClientLeftIsNotAFailure: a client that leaves while the LLM
// is asked counts as canceled, not as an LLM failure.
func TestEnhanceClientLeftIsNotAFailure(t *testing.T) {
	up := newFakeUpstream(t)
	asked := make(chan struct{}, 1)
	llm := newFakeLLM(t, "")
	llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
		asked <- struct{}{}
		<-r.Context().Done() // the gateway cancels its call when the client leaves
	})
	startCaddy(t, opsSite(up.endpoint(), llm, "timeout 5s", "")+"\nmetrics /metrics")
	before := scrape(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan result, 1)
	go func() { done <- send(ctx, http.MethodPost, "/v1/chat/completions", `{"prompt":"a cat"}`) }()
	streamWaitFor(t, asked, "the LLM call")
	cancel()
	<-done
	// the counter moves when the handler returns: poll for it
	deadline := time.Now().Add(10 * time.Second)
	for {
		after := scrape(t)
		if after.delta(before, "caddy_zimage_enhance_total", "outcome", "canceled") == 1 {
			if d := after.delta(before, "caddy_zimage_enhance_total", "outcome", "failed"); d != 0 {
				t.Errorf("enhance_total{failed} +%v, want +0", d)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("enhance_total{outcome=canceled} did not count the client that left")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("the image service got %d calls for a client that left", n)
	}
}

func itFailed(original string) string {
	return "**⚠️ Enhancement failed, using original prompt**\n\n**📝 Prompt:**\n" + original + "\n\n"
}

func TestIntegEnhance(t *testing.T) {
	const enhancedCat = "A fluffy ginger cat lounging on a terracotta rooftop at golden hour, warm light, soft shadows, cinematic composition, highly detailed"
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, "")
	startCaddy(t, itSite(up, itConfig{llm: llm, enhance: "timeout 2s\n\t\tmodel prompt-writer"}))
	for _, tc := range []struct {
		name, prompt, llmSays string
		wantUser              string // the user message the LLM got
		locked                string // the ratio the system message must lock, if any
		ratio                 string
		w, h                  int
	}{
		{"LLM ratio applies", "a cat on a roof", `{"prompt":"` + enhancedCat + `","aspect_ratio":"16:9"}`,
			"a cat on a roof", "", "16:9", 2048, 1152},
		{"fences and think block", "a cat on a roof", "<think>the user wants a cat</think>\nHere you go:\n```json\n{\"prompt\": \"" + enhancedCat + "\", \"aspect_ratio\": \"9:16\"}\n```",
			"a cat on a roof", "", "9:16", 1152, 2048},
		{"unlisted LLM ratio ignored", "a cat on a roof", `{"prompt":"` + enhancedCat + `","aspect_ratio":"4:3"}`,
			"a cat on a roof", "", "1:1", 2048, 2048},
		{"null LLM ratio", "a cat on a roof", `{"prompt":"` + enhancedCat + `","aspect_ratio":null}`,
			"a cat on a roof", "", "1:1", 2048, 2048},
		{"user ratio wins and is locked", "a cat on a roof, ratio 9:16", `{"prompt":"` + enhancedCat + `","aspect_ratio":"16:9"}`,
			"a cat on a roof", "9:16", "9:16", 1152, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			llm.setHandler(itLLMReplies(tc.llmSays))
			n, nl := len(up.Calls()), len(llm.Calls())
			content := itOK(t, itChatBody(t, tc.prompt))

			lc := itLLMCallsSince(llm, nl)
			if len(lc) != 1 {
				t.Fatalf("LLM received %d calls, want 1", len(lc))
			}
			b := lc[0].Body
			if lc[0].Auth != "Bearer "+testLLMKey || b.Model != "prompt-writer" || b.Temp != 0.7 {
				t.Errorf("LLM request auth %q model %q temperature %v", lc[0].Auth, b.Model, b.Temp)
			}
			if len(b.Messages) != 2 || b.Messages[0].Role != "system" || b.Messages[1].Role != "user" || b.Messages[1].Content != tc.wantUser {
				t.Fatalf("LLM messages %+v", b.Messages)
			}
			sys := b.Messages[0].Content
			if !strings.Contains(sys, "JSON") || !strings.Contains(sys, "aspect_ratio") || !strings.Contains(sys, "verbatim") {
				t.Errorf("system message does not ask for the JSON answer and verbatim image text: %q", sys)
			}
			if mentions := strings.Contains(strings.ToLower(sys), "locked"); mentions != (tc.locked != "") ||
				(tc.locked != "" && !strings.Contains(sys, tc.locked)) {
				t.Errorf("system message locked=%v (ratio %q): %q", mentions, tc.locked, sys)
			}

			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != enhancedCat || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want the enhanced prompt at %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.w, tc.h)
			}
			alt := string([]rune(enhancedCat)[:80])
			want := itMarkdown(strings.TrimSpace(alt), itImageURL(c.Body.Seed), itEnhanced(enhancedCat, tc.prompt), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

func TestIntegEnhanceDegrades(t *testing.T) {
	t.Setenv("ENHANCE_OPENAI_MODEL", "")
	hang := func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc // nil: the LLM's URL refuses connections
		enhance string
		prompt  string
		want    string // the prompt generated
		ratio   string
		w, h    int
	}{
		{"status 500", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, `{"error":{"message":"overloaded"}}`, http.StatusInternalServerError)
		}, "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"garbage text", itLLMReplies("Sorry, I cannot help with that."), "", "a lighthouse, ratio 3:4", "a lighthouse", "3:4", 1536, 2048},
		{"not a chat completion", func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, "<html>bad gateway</html>")
		}, "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"empty prompt ignores its ratio", itLLMReplies(`{"prompt":"  ","aspect_ratio":"16:9"}`), "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"slow past timeout", hang, "timeout 300ms", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"refused", nil, "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			cfg := itConfig{enhance: tc.enhance}
			var llm *fakeLLM
			if tc.handler != nil {
				llm = newFakeLLM(t, "")
				llm.setHandler(tc.handler)
				cfg.llm = llm
			} else {
				cfg.llmURL = itRefusedURL(t) + "/v1"
			}
			startCaddy(t, itSite(up, cfg))
			content := itOK(t, itChatBody(t, tc.prompt))
			if llm != nil {
				lc := llm.Calls()
				if len(lc) != 1 || lc[0].Body.Model != "gpt-4o-mini" {
					t.Errorf("LLM calls %+v, want one to the default model gpt-4o-mini", lc)
				}
			}
			c := itOnlyCall(t, up, 0)
			if c.Body.Prompt != tc.want || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want %q %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.want, tc.w, tc.h)
			}
			want := itMarkdown(tc.want, itImageURL(c.Body.Seed), itFailed(tc.prompt), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

// TestFaultLLMHostileBody: an LLM that answers 50 MB (a valid answer whose
// prompt is enormous, so a gateway that read it all would "succeed"), or
// that sends its headers and never ends its body. Either way the
// enhancement degrades within its 500ms timeout, the image is generated
// from the user's prompt, and the gateway stops reading.
func TestFaultLLMHostileBody(t *testing.T) {
	const total = 50 << 20
	for _, tc := range []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request, stop <-chan struct{}, written *atomic.Int64) string
	}{
		{"50 MB answer", func(w http.ResponseWriter, r *http.Request, stop <-chan struct{}, written *atomic.Int64) string {
			w.Header().Set("Content-Type", "application/json")
			n, _ := io.WriteString(w, `{"choices":[{"message":{"role":"assistant","content":"{\"prompt\":\"a stolen prompt `)
			written.Add(int64(n))
			chunk := []byte(strings.Repeat("a", 64<<10)) // streamed, never 50 MB at once
			for written.Load() < total {
				select {
				case <-stop:
					return "still writing when the test ended"
				default:
				}
				n, err := w.Write(chunk)
				written.Add(int64(n))
				if err != nil {
					return "released"
				}
			}
			_, _ = io.WriteString(w, `\"}"}}]}`)
			return "wrote it all"
		}},
		{"body never ends", func(w http.ResponseWriter, r *http.Request, stop <-chan struct{}, written *atomic.Int64) string {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, `{"choices":[{"message":{"role":"assistant","content":"{\"prompt\":\"a`)
			_ = http.NewResponseController(w).Flush()
			select {
			case <-r.Context().Done():
				return "released"
			case <-stop:
				return "still open when the test ended"
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			llm := newFakeLLM(t, "")
			stop := faultStop(t)
			var written atomic.Int64
			var once sync.Once
			done := make(chan struct{})
			var how atomic.Value
			llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
				defer faultSignal(&once, done)
				how.Store(tc.handler(w, r, stop, &written))
			})
			mark := faultLogMark(t)
			startCaddy(t, itSite(up, itConfig{llm: llm, enhance: "timeout 500ms"}))

			const prompt = "a lighthouse in a storm"
			content := itOK(t, itChatBody(t, prompt))
			c := itOnlyCall(t, up, 0)
			if c.Body.Prompt != prompt {
				t.Errorf("upstream prompt %.80q, want the user's %q", c.Body.Prompt, prompt)
			}
			if want := itMarkdown(prompt, itImageURL(c.Body.Seed), itFailed(prompt), "1:1", 2048, 2048); content != want {
				t.Errorf("content\n%.300q\nwant\n%q", content, want)
			}
			if n := len(llm.Calls()); n != 1 {
				t.Errorf("%d LLM calls, want 1", n)
			}
			faultAwait(t, done, "the LLM's connection to be released")
			if got := how.Load(); got != "released" {
				t.Errorf("the fake LLM ended with %v (%d bytes written), want its connection released", got, written.Load())
			}
			faultNoPanic(t, mark)
		})
	}
}

// TestFaultLLMRedirect: an LLM base URL that redirects to another server.
// The gateway does not follow (the Authorization header carries the LLM
// key), so the other server never hears from it — although it would answer
// a fine enhancement — and the request degrades.
func TestFaultLLMRedirect(t *testing.T) {
	var mu sync.Mutex
	var seen []string // Authorization headers the other server received
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		writeLLMAnswer(w, `{"prompt":"a prompt from the redirect target","aspect_ratio":"16:9"}`)
	}))
	t.Cleanup(other.Close)
	for _, status := range []int{http.StatusFound, http.StatusTemporaryRedirect} {
		t.Run(http.StatusText(status), func(t *testing.T) {
			up := newFakeUpstream(t)
			llm := newFakeLLM(t, "")
			llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, other.URL+"/v1/chat/completions", status)
			})
			startCaddy(t, itSite(up, itConfig{llm: llm, enhance: "timeout 500ms"}))

			const prompt = "a lighthouse in a storm"
			content := itOK(t, itChatBody(t, prompt))
			c := itOnlyCall(t, up, 0)
			if want := itMarkdown(prompt, itImageURL(c.Body.Seed), itFailed(prompt), "1:1", 2048, 2048); content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
			if lc := llm.Calls(); len(lc) != 1 || lc[0].Auth != "Bearer "+testLLMKey {
				t.Errorf("LLM calls %+v, want one with the key", lc)
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	for _, a := range seen {
		if strings.Contains(a, testLLMKey) {
			t.Errorf("the redirect target received the LLM key")
		}
	}
	if len(seen) != 0 {
		t.Errorf("the redirect target received %d requests, want none", len(seen))
	}
}

func FuzzUnitParseEnhanced(f *testing.F) {
	for _, s := range []string{
		`{"prompt":"a cat","aspect_ratio":"16:9"}`,
		"```json\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"3:2\"}\n```",
		"<think>hmm {x}</think>{\"prompt\":\"a cat\"}", "<think>{\"prompt\":\"x\"}", "<THINK></think>",
		`Here: {"prompt":"a cat","aspect_ratio":"4:3"} done`, `{"prompt":"a","aspect_ratio":7}`,
		`{"prompt":"","aspect_ratio":null}`, `{{{{{{{{`, "İİİ<think>x</think>{\"prompt\":\"p\"}", "ȺȺȺȺ<think>{}</think>{\"prompt\":\"p\"}", "",
		`{"prompt":"p","aspect_ratio":"16：9"}`, strings.Repeat("{", 100) + `{"prompt":"late"}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := parseEnhanced(in)
		if err != nil {
			if out != (enhanced{}) {
				t.Fatalf("parseEnhanced(%q) failed but returned %+v", in, out)
			}
			return
		}
		if out.prompt == "" || out.prompt != strings.TrimSpace(out.prompt) {
			t.Fatalf("parseEnhanced(%q) prompt %q: want trimmed and non-empty", in, out.prompt)
		}
		if _, listed := ratioSizes[out.ratio]; out.ratio != "" && !listed {
			t.Fatalf("parseEnhanced(%q) ratio %q: not one of the six", in, out.ratio)
		}
	})
}
