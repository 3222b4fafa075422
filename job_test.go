package zimage

// The job step through a real Caddy: the skip word, which size wins, the
// generation parameters and their defaults, and the generation log lines;
// and the random seed's range.

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

func TestIntegSkipWord(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"an enhanced cat","aspect_ratio":"16:9"}`)
	startCaddy(t, itSite(up, itConfig{llm: llm}))
	for _, tc := range []struct {
		name, prompt   string
		wantUp, wantOr string // upstream prompt, original shown in the markdown
		ratio          string
		w, h           int
	}{
		{"at the end", "a cat on a roof no-enhance", "a cat on a roof", "a cat on a roof", "1:1", 2048, 2048},
		{"any case, at the start", "NO-ENHANCE a cat", "a cat", "a cat", "1:1", 2048, 2048},
		{"with a ratio", "a cat No-Enhance ratio 9:16", "a cat", "a cat ratio 9:16", "9:16", 1152, 2048},
		{"in Chinese text", "一只猫 no-enhance", "一只猫", "一只猫", "1:1", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, nl := len(up.Calls()), len(llm.Calls())
			content := itOK(t, itChatBody(t, tc.prompt))
			if c := itLLMCallsSince(llm, nl); len(c) != 0 {
				t.Errorf("the LLM was called despite no-enhance: %+v", c)
			}
			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != tc.wantUp || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want %q %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.wantUp, tc.w, tc.h)
			}
			want := itMarkdown(tc.wantUp, itImageURL(c.Body.Seed), itPlain(tc.wantOr), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
	t.Run("a longer word is not the skip word", func(t *testing.T) {
		nl := len(llm.Calls())
		content := itOK(t, itChatBody(t, "a no-enhancement sign"))
		if c := itLLMCallsSince(llm, nl); len(c) != 1 || c[0].Body.Messages[1].Content != "a no-enhancement sign" {
			t.Errorf("LLM calls %+v, want one with the whole prompt", c)
		}
		if !strings.Contains(content, "**✨ Enhanced Prompt:**\nan enhanced cat\n") {
			t.Errorf("content %q", content)
		}
	})
}

func TestIntegSizePriority(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"a detailed scene","aspect_ratio":"9:16"}`)
	startCaddy(t, itSite(up, itConfig{llm: llm}))
	for _, tc := range []struct {
		name   string
		prompt string
		kv     []any
		ratio  string
		w, h   int
	}{
		{"body beats user and LLM", "a cat ratio 16:9", []any{"width", 1000, "height", 601}, "Custom", 1000, 600},
		{"rounded to a multiple of 8", "a cat", []any{"width", 1001, "height", 1004}, "Custom", 1000, 1008},
		{"fractions", "a cat", []any{"width", 777.7, "height", 333.3}, "Custom", 776, 336},
		{"clamped", "a cat", []any{"width", 5000, "height", 10}, "Custom", 2048, 64},
		{"width alone is ignored", "a cat", []any{"width", 640}, "9:16", 1152, 2048},
		{"user beats LLM", "a cat ratio 16:9", nil, "16:9", 2048, 1152},
		{"LLM beats the default", "a cat", nil, "9:16", 1152, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, itChatBody(t, tc.prompt, tc.kv...))
			c := itOnlyCall(t, up, n)
			if c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream size %dx%d, want %dx%d", c.Body.Width, c.Body.Height, tc.w, tc.h)
			}
			tail := "**🎨 Aspect Ratio:** " + tc.ratio + "\n**📐 Resolution:** " + strconv.Itoa(tc.w) + "×" + strconv.Itoa(tc.h)
			if !strings.HasSuffix(content, tail) {
				t.Errorf("content %q does not end with %q", content, tail)
			}
		})
	}
}

func TestIntegParamDefaults(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	itOK(t, itChatBody(t, "a cat"))
	itOK(t, itChatBody(t, "a cat"))
	calls := up.Calls()
	if len(calls) != 2 {
		t.Fatalf("%d upstream calls", len(calls))
	}
	for i, c := range calls {
		if c.Body.CFG != 7 || c.Body.Steps != 8 || c.Body.ModelIndex != 5 {
			t.Errorf("call %d: cfg %v steps %d model_index %d, want 7, 8, 5", i, c.Body.CFG, c.Body.Steps, c.Body.ModelIndex)
		}
		if c.Body.Seed < 0 || c.Body.Seed >= 2147483647 {
			t.Errorf("call %d: seed %d outside [0, 2147483647)", i, c.Body.Seed)
		}
		if _, present := itObject(t, []byte(c.Raw))["negative_prompt"]; present {
			t.Errorf("call %d: negative_prompt sent without one configured: %s", i, c.Raw)
		}
	}
	if calls[0].Body.Seed == calls[1].Body.Seed {
		t.Errorf("two requests without a seed both used %d", calls[0].Body.Seed)
	}
}

func TestIntegParams(t *testing.T) {
	up := newFakeUpstream(t)
	tuned := "model Z-Image\n\tmodel Z-Tuned {\n\t\tmodel_index 3\n\t\tsteps 20\n\t\tcfg 4.5\n\t\tnegative_prompt \"low quality, watermark\"\n\t}"
	startCaddy(t, itSite(up, itConfig{gateway: tuned}))
	const random = -1
	for _, tc := range []struct {
		name       string
		kv         []any
		cfg        float64
		seed       int64
		negative   string // "" means the field is absent
		index, stp int
	}{
		{"explicit values", []any{"cfg", 3.5, "seed", 42, "negative_prompt", "blurry"}, 3.5, 42, "blurry", 5, 8},
		{"seed as a string", []any{"seed", "123"}, 7, 123, "", 5, 8},
		{"seed null is random", []any{"seed", nil}, 7, random, "", 5, 8},
		{"model defaults", []any{"model", "Z-Tuned"}, 4.5, random, "low quality, watermark", 3, 20},
		{"explicit beats model defaults", []any{"model", "z-tuned", "cfg", 9, "seed", 5, "negative_prompt", "cartoon"}, 9, 5, "cartoon", 3, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, itChatBody(t, "a cat", tc.kv...))
			c := itOnlyCall(t, up, n)
			b := c.Body
			if b.CFG != tc.cfg || b.NegativePrompt != tc.negative || b.ModelIndex != tc.index || b.Steps != tc.stp {
				t.Errorf("upstream cfg %v negative %q model_index %d steps %d, want %v %q %d %d",
					b.CFG, b.NegativePrompt, b.ModelIndex, b.Steps, tc.cfg, tc.negative, tc.index, tc.stp)
			}
			if tc.seed == random {
				if b.Seed < 0 || b.Seed >= 2147483647 {
					t.Errorf("seed %d outside [0, 2147483647)", b.Seed)
				}
			} else if b.Seed != tc.seed {
				t.Errorf("seed %d, want %d", b.Seed, tc.seed)
			}
			if _, present := itObject(t, []byte(c.Raw))["negative_prompt"]; present != (tc.negative != "") {
				t.Errorf("negative_prompt present=%v in %s", present, c.Raw)
			}
			if !strings.Contains(content, "]("+itImageURL(b.Seed)+")") {
				t.Errorf("content %q lacks the image of seed %d", content, b.Seed)
			}
		})
	}
}

// TestOpsLogsGenerationLine: one info line per generation with the
// endpoint, configured model, size, ratio and its source (body, user, llm,
// default), seed, enhancement outcome, queue wait, upstream latency and
// status; the prompt text only at debug level.
func TestOpsLogsGenerationLine(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"llmcanary glowing jellyfish, deep sea","aspect_ratio":"9:16"}`)
	startCaddy(t, opsSite(up.endpoint(), llm, "timeout 10s\n\t\tmax_concurrent 4", "model Z-Image {\n\t\talias dall-e-3\n\t}"))

	// prompt texts that must stay out of info and warn lines: the LLM's
	// prompt, and each case's own
	canaries := []string{"llmcanary"}
	mark := markLog(t)
	for _, tc := range []struct {
		name, path, body string
		canary           string
		seed             int
		endpoint, size   string
		ratio, source    string
		enhance          string
	}{
		{"body size", "/v1/chat/completions", `{"model":"dall-e-3","seed":61,"width":1000,"height":600,"messages":[{"role":"user","content":"bodycanary fox no-enhance"}]}`,
			"bodycanary", 61, "chat_completions", "1000x600", "Custom", "body", "skipped"},
		// a body size that is one of the six (the playground's 16:9 button)
		// is logged as its ratio; the markdown still says Custom
		{"body size of a ratio", "/v1/chat/completions", `{"model":"dall-e-3","seed":65,"width":2048,"height":1152,"messages":[{"role":"user","content":"ratiobodycanary fox no-enhance"}]}`,
			"ratiobodycanary", 65, "chat_completions", "2048x1152", "16:9", "body", "skipped"},
		{"images size of a ratio", "/v1/images/generations", `{"model":"Z-Image","prompt":"imgratiocanary fox no-enhance","seed":66,"size":"2048x1152"}`,
			"imgratiocanary", 66, "images_generations", "2048x1152", "16:9", "body", "skipped"},
		{"user ratio", "/v1/chat/completions", chatJSON("usercanary fox ratio 16:9", 62, ""),
			"usercanary", 62, "chat_completions", "2048x1152", "16:9", "user", "ok"},
		{"llm ratio", "/v1/images/generations", `{"model":"DALL-E-3","prompt":"llmratiocanary fox","seed":63}`,
			"llmratiocanary", 63, "images_generations", "1152x2048", "9:16", "llm", "ok"},
		{"default ratio", "/v1/chat/completions", chatJSON("defaultcanary fox no-enhance", 64, `,"stream":true`),
			"defaultcanary", 64, "chat_completions", "2048x2048", "1:1", "default", "skipped"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			canaries = append(canaries, tc.canary)
			status, _, body := do(t, http.MethodPost, tc.path, tc.body)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, body)
			}
			if tc.source == "body" && tc.endpoint == "chat_completions" && !strings.Contains(string(body), "**🎨 Aspect Ratio:** Custom") {
				t.Errorf("a body size's markdown does not say Custom: %s", body)
			}
			lines := mark.find(t, "generation", withSeed(tc.seed))
			if len(lines) != 1 {
				t.Fatalf("%d generation lines for seed %d, want 1", len(lines), tc.seed)
			}
			l := lines[0]
			for k, want := range map[string]any{
				"level": "info", "logger": "http.handlers.zimage_gateway",
				"endpoint": tc.endpoint, "model": "Z-Image", "size": tc.size,
				"ratio": tc.ratio, "ratio_source": tc.source, "enhance": tc.enhance,
				"status": float64(200),
			} {
				if l[k] != want {
					t.Errorf("%s = %v, want %v", k, l[k], want)
				}
			}
			for _, k := range []string{"queue_wait", "upstream_latency"} {
				if _, ok := l[k].(float64); !ok {
					t.Errorf("%s missing or not a duration: %v", k, l[k])
				}
			}
			// the prompt is there for debugging, at debug level only
			debug := mark.find(t, "generation prompt", func(m map[string]any) bool {
				return m["level"] == "debug" && strings.Contains(fmt.Sprint(m["original"]), tc.canary)
			})
			if len(debug) != 1 {
				t.Errorf("%d debug lines with the prompt, want 1", len(debug))
			}
		})
	}

	for _, l := range mark.lines(t) {
		if l["level"] == "debug" {
			continue
		}
		line := fmt.Sprint(l)
		for _, c := range canaries {
			if strings.Contains(line, c) {
				t.Errorf("prompt text %q in a %v line: %s", c, l["level"], line)
			}
		}
	}
}

// TestOpsLogsFailures: every upstream failure is a warn line with its kind
// (retried attempts included), the generation line carries the failure,
// an LLM failure is a warn line with its cause, and a secret the upstream
// echoes back never reaches the log.
func TestOpsLogsFailures(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"unused"}`)
	startCaddy(t, opsSite(up.endpoint(), llm, "timeout 10s", ""))
	start := markLog(t)

	t.Run("upstream 503 echoing the key", func(t *testing.T) {
		mark := markLog(t)
		up.setHandler(func(w http.ResponseWriter, r *http.Request) {
			failWith(503, `{"error":"overloaded; you sent `+r.Header.Get("Authorization")+`"}`)(w, r)
		})
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("warn me no-enhance", 71, ""))
		if status != http.StatusBadGateway {
			t.Fatalf("status %d, want 502: %s", status, body)
		}
		retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool {
			return l["level"] == "warn" && l["kind"] == "status_5xx" && l["attempt"] == float64(1)
		})
		failed := mark.find(t, "image service call failed", func(l map[string]any) bool {
			return l["level"] == "warn" && l["kind"] == "status_5xx" && l["model"] == "Z-Image"
		})
		gen := mark.find(t, "generation", withSeed(71))
		if len(retried) != 1 || len(failed) != 1 || len(gen) != 1 || gen[0]["failure"] != "status_5xx" || gen[0]["status"] != float64(502) {
			t.Fatalf("retry warnings %d, failure warnings %d, generation lines %v", len(retried), len(failed), gen)
		}
		for _, l := range append(retried, failed...) {
			if msg := fmt.Sprint(l["error"]); !strings.Contains(msg, "[redacted]") || strings.Contains(msg, testSDKey) {
				t.Errorf("error field %q: want the echoed key redacted", msg)
			}
		}
	})

	t.Run("LLM 500", func(t *testing.T) {
		mark := markLog(t)
		up.setHandler(nil)
		llm.setHandler(failWith(500, `{"error":"llm down"}`))
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("enhance fails", 72, ""))
		if status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
		warns := mark.find(t, "prompt enhancement failed; using the original prompt", func(l map[string]any) bool {
			return l["level"] == "warn" && strings.Contains(fmt.Sprint(l["error"]), "500")
		})
		gen := mark.find(t, "generation", withSeed(72))
		if len(warns) != 1 || len(gen) != 1 || gen[0]["enhance"] != "failed" {
			t.Fatalf("LLM warnings with the cause: %d; generation lines %v", len(warns), gen)
		}
	})

	for _, l := range start.lines(t) {
		line := fmt.Sprint(l)
		for _, s := range testSecrets {
			if strings.Contains(line, s) {
				t.Fatalf("a configured secret is in the log: %s", line)
			}
		}
	}
}

// Random seeds are drawn from [1, 2^31-1): the service fails on 0. The source is pinned to its extremes.
func TestUnitRandomSeedRange(t *testing.T) {
	defer func(f func(int64) int64) { seedSource = f }(seedSource)
	for _, tc := range []struct {
		draw func(n int64) int64
		want int64
	}{
		{func(int64) int64 { return 0 }, 1},
		{func(n int64) int64 { return n - 1 }, maxSeed - 1},
	} {
		seedSource = tc.draw
		if got := randomSeed(); got != tc.want {
			t.Errorf("randomSeed() = %d, want %d", got, tc.want)
		}
	}
}
