package zimage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// defaultSystemPrompt asks the LLM for a JSON object with an English Stable
// Diffusion prompt and an aspect ratio (docs/design.md#the-prompt).
const defaultSystemPrompt = `You are an expert prompt writer for Stable Diffusion image models.
Turn the user's short idea, in any language, into one rich English image prompt of 30 to 100 words: subject, setting, composition, lighting, colours, mood and style, as comma-separated descriptive phrases.
Text that should appear in the image (on signs, shirts, banners, screens; usually written in quotes) must be kept verbatim in its original language and quoted in your prompt; never translate it.
Choose the aspect ratio that suits the content best, one of: 1:1, 1:2, 3:2, 3:4, 16:9, 9:16; use null when none fits better than another.
Answer with a single JSON object and nothing else:
{"prompt": "<30-100 word English Stable Diffusion prompt>", "aspect_ratio": "<one of the six ratios>" or null}`

// Outcomes of the enhancement step, as shown in metrics and logs.
const (
	enhanceOK       = "ok"
	enhanceFailed   = "failed"
	enhanceSkipped  = "skipped"
	enhanceDisabled = "disabled"
	enhanceCanceled = "canceled" // the client left while the LLM was asked
)

// maxLLMBody bounds how much of the LLM's answer is read.
const maxLLMBody = 1 << 20

// enhancer calls an OpenAI-compatible chat completions endpoint.
type enhancer struct {
	url     string
	key     string
	model   string
	system  string
	timeout time.Duration
	client  *http.Client
}

func newEnhancer(baseURL, key, model, system string, timeout time.Duration) *enhancer {
	return &enhancer{
		url:     strings.TrimRight(baseURL, "/") + "/chat/completions",
		key:     key,
		model:   model,
		system:  system,
		timeout: timeout,
		client:  newKeyedClient(),
	}
}

// enhanced is what the LLM proposed.
type enhanced struct {
	prompt string
	ratio  string // one of ratioSizes, or empty
}

type llmMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type llmRequest struct {
	Model       string       `json:"model"`
	Messages    []llmMessage `json:"messages"`
	Temperature float64      `json:"temperature"`
}

type llmResponse struct {
	Choices []struct {
		Message struct {
			Content string `json:"content"`
		} `json:"message"`
	} `json:"choices"`
}

// enhance asks the LLM once. lockedRatio is the ratio the user wrote, if
// any; the LLM is told not to change it. Every error means "use the user's
// own prompt": the caller degrades silently.
func (e *enhancer) enhance(ctx context.Context, prompt, lockedRatio string) (enhanced, error) {
	ctx, cancel := context.WithTimeout(ctx, e.timeout)
	defer cancel()

	system := e.system
	if lockedRatio != "" {
		system += "\nThe user has locked the aspect ratio to " + lockedRatio +
			`: set "aspect_ratio" to "` + lockedRatio + `" and do not suggest another.`
	}
	body, err := json.Marshal(llmRequest{
		Model: e.model,
		Messages: []llmMessage{
			{Role: "system", Content: system},
			{Role: "user", Content: prompt},
		},
		Temperature: 0.7,
	})
	if err != nil {
		return enhanced{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.url, bytes.NewReader(body))
	if err != nil {
		return enhanced{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+e.key)
	resp, err := e.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return enhanced{}, fmt.Errorf("enhance: no answer within %s", e.timeout)
		}
		return enhanced{}, fmt.Errorf("enhance: %w", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxLLMBody+1))
	if err != nil {
		return enhanced{}, fmt.Errorf("enhance: reading answer: %w", err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return enhanced{}, fmt.Errorf("enhance: LLM answered status %d", resp.StatusCode)
	}
	if len(raw) > maxLLMBody {
		return enhanced{}, fmt.Errorf("enhance: answer larger than %d bytes", maxLLMBody)
	}
	var lr llmResponse
	if err := json.Unmarshal(raw, &lr); err != nil {
		return enhanced{}, fmt.Errorf("enhance: decoding answer: %w", err)
	}
	if len(lr.Choices) == 0 {
		return enhanced{}, errors.New("enhance: answer has no choices")
	}
	out, err := parseEnhanced(lr.Choices[0].Message.Content)
	if err != nil {
		return enhanced{}, err
	}
	if lockedRatio != "" {
		out.ratio = lockedRatio
	}
	return out, nil
}

// parseEnhanced digs the JSON object out of what a chat model wrote:
// reasoning in <think> blocks, markdown code fences and prose around the
// object are all common, so the first object that decodes with a non-empty
// prompt wins. A ratio outside the supported six is dropped.
func parseEnhanced(content string) (enhanced, error) {
	content = stripThink(content)
	// a bounded number of tries keeps a hostile answer full of braces linear
	for i, tries := 0, 0; i < len(content) && tries < 64; i, tries = i+1, tries+1 {
		j := strings.IndexByte(content[i:], '{')
		if j < 0 {
			break
		}
		i += j
		var obj struct {
			Prompt      string `json:"prompt"`
			AspectRatio any    `json:"aspect_ratio"`
		}
		dec := json.NewDecoder(strings.NewReader(content[i:]))
		if err := dec.Decode(&obj); err != nil {
			continue
		}
		p := strings.TrimSpace(obj.Prompt)
		if p == "" {
			continue
		}
		out := enhanced{prompt: p}
		if r, ok := obj.AspectRatio.(string); ok {
			r = strings.ReplaceAll(strings.TrimSpace(r), "：", ":")
			if _, listed := ratioSizes[r]; listed {
				out.ratio = r
			}
		}
		return out, nil
	}
	return enhanced{}, errors.New("enhance: no JSON object with a prompt in the model's answer")
}

// stripThink removes <think>…</think> blocks (and an unclosed trailing one)
// that reasoning models put before their answer.
func stripThink(s string) string {
	for {
		lower := asciiLower(s) // same byte offsets as s
		i := strings.Index(lower, "<think>")
		if i < 0 {
			return s
		}
		j := strings.Index(lower[i:], "</think>")
		if j < 0 {
			return s[:i]
		}
		s = s[:i] + s[i+j+len("</think>"):]
	}
}

// EnhanceConfig configures the OpenAI-compatible LLM used for prompt
// enhancement. Every failure of the LLM silently falls back to the user's
// own prompt.
type EnhanceConfig struct {
	// Off disables enhancement even when a key is available.
	Off bool `json:"off,omitempty"`

	// APIKey is the LLM's bearer token. Placeholders are accepted.
	// Default: the environment variable ENHANCE_OPENAI_API_KEY.
	APIKey string `json:"api_key,omitempty"`

	// BaseURL is the LLM API's base URL, to which /chat/completions is
	// appended. Placeholders are accepted. Default: the environment variable
	// ENHANCE_OPENAI_BASE_URL, else https://api.openai.com/v1.
	BaseURL string `json:"base_url,omitempty"`

	// Model is the LLM model name. Default: the environment variable
	// ENHANCE_OPENAI_MODEL, else gpt-4o-mini.
	Model string `json:"model,omitempty"`

	// Timeout bounds the LLM call. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// SystemPrompt replaces the built-in system prompt.
	SystemPrompt string `json:"system_prompt,omitempty"`

	// SystemPromptFile reads the system prompt from a file at load time.
	SystemPromptFile string `json:"system_prompt_file,omitempty"`
}

// provisionEnhance resolves the LLM settings; it returns nil when
// enhancement is off or no key resolves.
func (g *Gateway) provisionEnhance(resolve func(v, env string) string) (*enhancer, error) {
	var ec EnhanceConfig
	if g.Enhance != nil {
		ec = *g.Enhance
	}
	if ec.Off {
		return nil, nil
	}
	key := resolve(ec.APIKey, "ENHANCE_OPENAI_API_KEY")
	if key == "" {
		return nil, nil
	}
	base := resolve(ec.BaseURL, "ENHANCE_OPENAI_BASE_URL")
	if base == "" {
		base = defaultEnhanceBaseURL
	}
	if err := checkHTTPURL(base); err != nil {
		return nil, fmt.Errorf("zimage_gateway: enhance: base_url: %v", err)
	}
	name := resolve(ec.Model, "ENHANCE_OPENAI_MODEL")
	if name == "" {
		name = defaultEnhanceModel
	}
	timeout := time.Duration(ec.Timeout)
	if timeout <= 0 {
		timeout = defaultEnhanceTimeout
	}
	system := ec.SystemPrompt
	if ec.SystemPromptFile != "" {
		if system != "" {
			return nil, errors.New("zimage_gateway: enhance: use either system_prompt or system_prompt_file, not both")
		}
		b, err := os.ReadFile(ec.SystemPromptFile)
		if err != nil {
			return nil, fmt.Errorf("zimage_gateway: enhance: system_prompt_file: %v", err)
		}
		system = string(b)
	}
	if strings.TrimSpace(system) == "" {
		system = defaultSystemPrompt
	}
	return newEnhancer(base, key, name, system, timeout), nil
}

func unmarshalEnhance(d *caddyfile.Dispenser) (*EnhanceConfig, error) {
	e := new(EnhanceConfig)
	if d.NextArg() {
		if d.Val() != "off" {
			return nil, d.Errf("zimage_gateway: enhance takes 'off' or a block, not '%s'", d.Val())
		}
		e.Off = true
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	err := eachOption(d, "enhance", func(opt string) (err error) {
		switch opt {
		case "api_key":
			e.APIKey, err = optionalArg(d)
		case "base_url":
			e.BaseURL, err = optionalArg(d)
		case "model":
			e.Model, err = optionalArg(d)
		case "timeout":
			e.Timeout, err = parseDuration(d)
		case "system_prompt":
			e.SystemPrompt, err = singleArg(d)
		case "system_prompt_file":
			e.SystemPromptFile, err = singleArg(d)
		default:
			return d.Errf("unrecognized zimage_gateway enhance option '%s'", opt)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if e.SystemPrompt != "" && e.SystemPromptFile != "" {
		return nil, d.Err("zimage_gateway: enhance: use either system_prompt or system_prompt_file, not both")
	}
	return e, nil
}
