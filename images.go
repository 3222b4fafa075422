package zimage

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// imagesRequest is the OpenAI Images API body plus the gateway's
// extensions (seed, cfg, negative_prompt). Fields the gateway cannot use
// (quality, style, user, background, output_format, …) are ignored.
type imagesRequest struct {
	Prompt         *string         `json:"prompt"`
	Model          string          `json:"model"`
	N              *int            `json:"n"`
	Size           string          `json:"size"`
	ResponseFormat string          `json:"response_format"`
	Seed           json.RawMessage `json:"seed"`
	CFG            *float64        `json:"cfg"`
	NegativePrompt *string         `json:"negative_prompt"`
	Stream         bool            `json:"stream"`
}

const maxImagesN = 4

type imagesResponse struct {
	Created int64       `json:"created"`
	Data    []imageData `json:"data"`
}

type imageData struct {
	URL           string `json:"url,omitempty"`
	B64JSON       string `json:"b64_json,omitempty"`
	RevisedPrompt string `json:"revised_prompt"`
}

// parseFormat reads response_format: url (the default) or b64_json.
func parseFormat(s string) (string, *apiError) {
	switch f := strings.ToLower(strings.TrimSpace(s)); f {
	case "":
		return "url", nil
	case "url", "b64_json":
		return f, nil
	}
	return "", invalidRequest("response_format", "response_format must be \"url\" or \"b64_json\"")
}

// parseSize reads "WxH"; "auto" or "" leave the size to the ratio rules.
func parseSize(s string) (w, h *float64, e *apiError) {
	s = strings.TrimSpace(strings.ToLower(s))
	if s == "" || s == "auto" {
		return nil, nil, nil
	}
	ws, hs, ok := strings.Cut(s, "x")
	wi, err1 := strconv.Atoi(strings.TrimSpace(ws))
	hi, err2 := strconv.Atoi(strings.TrimSpace(hs))
	if !ok || err1 != nil || err2 != nil || wi <= 0 || hi <= 0 {
		return nil, nil, invalidRequest("size", "Invalid size "+strconv.Quote(truncate(s, 40))+": expected \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\"")
	}
	wf, hf := float64(wi), float64(hi)
	return &wf, &hf, nil
}

// serveImages answers POST /v1/images/generations.
func (g *Gateway) serveImages(w http.ResponseWriter, r *http.Request) {
	body, e := g.readBody(w, r, g.MaxBody)
	if e != nil {
		g.fail(w, endpointImages, "", e)
		return
	}
	var req imagesRequest
	if e := decodeJSON(body, &req); e != nil {
		g.fail(w, endpointImages, "", e)
		return
	}
	if req.Prompt == nil || strings.TrimSpace(*req.Prompt) == "" {
		g.fail(w, endpointImages, "", invalidRequest("prompt", "'prompt' is required"))
		return
	}
	prompt := strings.TrimSpace(*req.Prompt)
	if utf8.RuneCountInString(prompt) > g.MaxPromptLength {
		g.fail(w, endpointImages, "", invalidRequest("prompt", fmt.Sprintf("The prompt is longer than %d characters", g.MaxPromptLength)))
		return
	}
	m := g.lookupModel(req.Model)
	if m == nil {
		g.fail(w, endpointImages, "", errModelNotFound(req.Model))
		return
	}
	n := 1
	if req.N != nil {
		n = *req.N
	}
	if n < 1 || n > maxImagesN {
		g.fail(w, endpointImages, m.name, invalidRequest("n", fmt.Sprintf("n must be between 1 and %d", maxImagesN)))
		return
	}
	format, e := parseFormat(req.ResponseFormat)
	if e != nil {
		g.fail(w, endpointImages, m.name, e)
		return
	}
	width, height, e := parseSize(req.Size)
	if e != nil {
		g.fail(w, endpointImages, m.name, e)
		return
	}
	p := jobParams{prompt: prompt, width: width, height: height, cfg: req.CFG, negative: req.NegativePrompt, n: n}
	j, e := g.checkedJob(r, endpointImages, m, req.Model, p, req.Seed)
	if e != nil {
		g.fail(w, endpointImages, m.name, e)
		return
	}

	g.run(w, r, j, n, g.imagesRenderer(req.Stream, format))
}

// imagesRenderer is the way out of the Images API (generations and
// edits): a JSON answer with URLs or base64, or a stream of events.
func (g *Gateway) imagesRenderer(stream bool, format string) renderer {
	if stream {
		return &imagesStream{interval: time.Duration(g.StreamKeepalive)}
	}
	return imagesJSON{b64: format == "b64_json"}
}

// imagesJSON answers {"created","data":[{"url"|"b64_json","revised_prompt"}]}
// (SPEC §5, §10.1).
type imagesJSON struct{ b64 bool }

func (o imagesJSON) needBytes() bool                               { return o.b64 }
func (imagesJSON) begin(http.ResponseWriter, *job)                 {}
func (imagesJSON) fail(w http.ResponseWriter, _ *job, e *apiError) { writeError(w, e) }

func (o imagesJSON) write(w http.ResponseWriter, res *output) {
	if o.b64 {
		writeB64Answer(w, res.jobs, res.images)
		return
	}
	data := make([]imageData, len(res.jobs))
	for i, j := range res.jobs {
		data[i] = imageData{URL: j.imageURL, RevisedPrompt: j.prompt}
	}
	writeJSON(w, http.StatusOK, imagesResponse{Created: time.Now().Unix(), Data: data})
}

// generateN runs n generations of one enhanced job in parallel (each waits
// for its own slot in the limiter), with seed, seed+1, … when the client
// fixed the seed and fresh random seeds otherwise. The first failure
// cancels the others and fails the request.
func (g *Gateway) generateN(ctx context.Context, base *job, n int) ([]*job, *apiError) {
	if n == 1 {
		// one image, as every chat asks for: no goroutine, context or copy
		// of the job (the hot path, issue 17 item 11)
		if e := g.generate(ctx, base); e != nil {
			return nil, e
		}
		return []*job{base}, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make([]*job, n)
	errs := make([]*apiError, n)
	var wg sync.WaitGroup
	for i := range n {
		j := *base
		switch {
		case i == 0:
		case base.fixedSeed:
			// seed, seed+1, …, wrapping past the largest seed to 1, never 0
			if j.seed = base.seed + int64(i); j.seed >= maxSeed {
				j.seed -= maxSeed - 1
			}
		default:
			j.seed = randomSeed()
		}
		jobs[i] = &j
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = g.generate(ctx, jobs[i]); errs[i] != nil {
				cancel()
			}
		}()
	}
	wg.Wait()
	if e := rootCause(errs); e != nil {
		return nil, e
	}
	return jobs, nil
}

// rootCause is the first failure that is not a cancellation it caused in
// a sibling.
func rootCause(errs []*apiError) *apiError {
	var first *apiError
	for _, e := range errs {
		if e != nil && (first == nil || first.status == 499) {
			first = e
		}
	}
	return first
}

// writeB64Answer writes the images answer with each image's base64 encoded
// straight into the response, so an image is held once, as its bytes, and
// never again as a base64 string and its JSON encoding (issue 8).
func writeB64Answer(w http.ResponseWriter, jobs []*job, images [][]byte) {
	head := []byte(`{"created":` + strconv.FormatInt(time.Now().Unix(), 10) + `,"data":[`)
	tails := make([][]byte, len(jobs))
	total := len(head) + len("]}")
	for i, j := range jobs {
		p, _ := json.Marshal(j.prompt)
		tails[i] = append([]byte(`","revised_prompt":`), append(p, '}')...)
		total += len(`{"b64_json":"`) + base64.StdEncoding.EncodedLen(len(images[i])) + len(tails[i])
		if i > 0 {
			total++
		}
	}
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(total)}
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 32<<10)
	bw.Write(head)
	for i := range jobs {
		if i > 0 {
			bw.WriteByte(',')
		}
		bw.WriteString(`{"b64_json":"`)
		enc := base64.NewEncoder(base64.StdEncoding, bw)
		enc.Write(images[i])
		enc.Close()
		bw.Write(tails[i])
	}
	bw.WriteString("]}")
	_ = bw.Flush() // a client that left is not an error to report
}
