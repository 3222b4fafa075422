package zimage

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The models clients may ask for: their config, their provisioning and the
// /v1/models endpoints.

// ModelConfig is one model name offered to clients.
type ModelConfig struct {
	// Name is the model id listed by /v1/models.
	Name string `json:"name"`

	// Aliases are other names clients may send (e.g. dall-e-3, which some
	// chat clients hard-code for images). They are not listed by /v1/models.
	Aliases []string `json:"aliases,omitempty"`

	// ModelIndex is the upstream's model_index. Default: 5.
	ModelIndex *int `json:"model_index,omitempty"`

	// Steps is the number of sampling steps. Default: 8.
	Steps int `json:"steps,omitempty"`

	// CFG is the default guidance scale. Default: 7.0.
	CFG *float64 `json:"cfg,omitempty"`

	// NegativePrompt is the default negative prompt. Default: none.
	NegativePrompt string `json:"negative_prompt,omitempty"`

	// Edit marks an edit model (docs/design.md#edits): it takes a source image and an
	// instruction, as the service's Qwen Image Edit models (model_index 18
	// and 19) do, and serves /v1/images/edits and chat messages with an
	// image. Steps, cfg and negative_prompt do not apply to it.
	Edit bool `json:"edit,omitempty"`

	// UpstreamName is the image service's own name of this model, as its
	// success answers give it in data.model_name. The service's
	// model_index is a position in its model menu, and the menu moves
	// (docs/design.md#model-identity): after each generation the gateway compares the name the
	// service reports with this one, and a mismatch is warned about (or
	// refused, see OnMismatch). The two match when one contains the other
	// once both are lower-cased and stripped of spaces, '-', '_' and '.',
	// so "Z-Image" matches "z_image turbo". Default: "Z-Image" for the
	// default model (when no model is configured at all), none otherwise
	// (no check).
	UpstreamName string `json:"upstream_name,omitempty"`

	// OnMismatch is what a mismatch with UpstreamName does: "warn" logs
	// one warning per model per config load and answers the image anyway
	// (it has been paid for); "refuse" answers a 502 with code
	// model_mismatch instead of the image. Both count
	// caddy_zimage_model_mismatch_total. Default: warn.
	OnMismatch string `json:"on_mismatch,omitempty"`

	// DefaultResponseFormat is how this model's images are answered by the
	// Images API when a request gives no response_format: "url",
	// "b64_json" or "both". Default: the gateway's default_response_format.
	DefaultResponseFormat string `json:"default_response_format,omitempty"`
	// ResponsesText overrides the gateway's responses_text for this
	// model: whether its Responses API answers carry the markdown message
	// beside the image item. Default: the gateway's setting.
	ResponsesText *bool `json:"responses_text,omitempty"`
}

// The values of on_mismatch (docs/design.md#model-identity).
const (
	onMismatchWarn   = "warn"
	onMismatchRefuse = "refuse"
)

// maxMismatchRunes bounds each name the mismatch warning and error carry.
const maxMismatchRunes = 100

// model is a resolved ModelConfig.
type model struct {
	name           string
	modelIndex     int
	steps          int
	cfg            float64
	negativePrompt string
	created        int64
	edit           bool   // an edit model (docs/design.md#edits)
	defaultFormat  string // default_response_format; "" = the gateway's
	responsesText  bool   // Responses API answers carry the markdown message

	// model identity (docs/design.md#model-identity): the service's name of the model and its
	// normalised form ("" = no check); warned is set by the first mismatch,
	// so that a config load warns once per model
	upstreamName string
	upstreamKey  string
	refuse       bool
	warned       atomic.Bool
}

// provisionModels fills model defaults and builds the case-insensitive index
// of names and aliases.
func (g *Gateway) provisionModels() error {
	cfgs := g.Models
	if len(cfgs) == 0 {
		// the one default model is the service's Z-Image (docs/design.md#model-identity)
		cfgs = []ModelConfig{{Name: defaultModelName, UpstreamName: defaultModelName}}
	}
	var err error
	if g.DefaultResponseFormat, err = parseDefaultFormat(g.DefaultResponseFormat); err != nil {
		return fmt.Errorf("zimage_gateway: %v", err)
	}
	now := time.Now().Unix()
	g.models = make([]*model, 0, len(cfgs))
	g.modelIndex = make(map[string]*model)
	for _, mc := range cfgs {
		name := strings.TrimSpace(mc.Name)
		if name == "" {
			return errors.New("zimage_gateway: model: a name is required")
		}
		m := &model{
			name:           name,
			modelIndex:     defaultModelIndex,
			steps:          defaultSteps,
			cfg:            defaultCFG,
			negativePrompt: mc.NegativePrompt,
			edit:           mc.Edit,
			created:        now,
			responsesText:  g.ResponsesText == nil || *g.ResponsesText,
		}
		if mc.ResponsesText != nil {
			m.responsesText = *mc.ResponsesText
		}
		if mc.ModelIndex != nil {
			if *mc.ModelIndex < 0 {
				return fmt.Errorf("zimage_gateway: model %s: model_index must be 0 or more, got %d", name, *mc.ModelIndex)
			}
			m.modelIndex = *mc.ModelIndex
		}
		if mc.Steps < 0 {
			return fmt.Errorf("zimage_gateway: model %s: steps must be positive, got %d", name, mc.Steps)
		}
		if mc.Steps > 0 {
			m.steps = mc.Steps
		}
		if mc.CFG != nil {
			if *mc.CFG <= 0 || *mc.CFG > 30 {
				return fmt.Errorf("zimage_gateway: model %s: cfg must be in (0, 30], got %g", name, *mc.CFG)
			}
			m.cfg = *mc.CFG
		}
		if err := m.provisionIdentity(mc); err != nil {
			return err
		}
		if m.defaultFormat, err = parseDefaultFormat(mc.DefaultResponseFormat); err != nil {
			return fmt.Errorf("zimage_gateway: model %s: %v", name, err)
		}
		for _, n := range append([]string{name}, mc.Aliases...) {
			key := strings.ToLower(strings.TrimSpace(n))
			if key == "" {
				continue
			}
			if _, dup := g.modelIndex[key]; dup {
				return fmt.Errorf("zimage_gateway: model: duplicate model name or alias %q", n)
			}
			g.modelIndex[key] = m
		}
		g.models = append(g.models, m)
	}
	list := modelList{Object: "list", Data: make([]modelObject, 0, len(g.models))}
	for i, m := range g.models {
		list.Data = append(list.Data, m.object())
		if g.ListAliases && i < len(g.Models) {
			for _, a := range g.Models[i].Aliases {
				if a = strings.TrimSpace(a); a != "" {
					list.Data = append(list.Data, m.objectAs(a))
				}
			}
		}
	}
	g.modelsJSON, err = json.Marshal(list)
	return err
}

// provisionIdentity resolves upstream_name and on_mismatch (docs/design.md#model-identity).
func (m *model) provisionIdentity(mc ModelConfig) error {
	switch strings.TrimSpace(mc.OnMismatch) {
	case "", onMismatchWarn:
	case onMismatchRefuse:
		m.refuse = true
	default:
		return fmt.Errorf("zimage_gateway: model %s: on_mismatch must be warn or refuse, got %q", m.name, mc.OnMismatch)
	}
	m.upstreamName = strings.TrimSpace(mc.UpstreamName)
	m.upstreamKey = modelKey(m.upstreamName)
	if m.upstreamName != "" && m.upstreamKey == "" {
		// a name of separators only would match every answer
		return fmt.Errorf("zimage_gateway: model %s: upstream_name %q has no letter or digit; give the service's name of the model", m.name, mc.UpstreamName)
	}
	return nil
}

// modelKey is a model name as the identity check compares it: lower-cased,
// without spaces, '-', '_' and '.'.
func modelKey(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case ' ', '-', '_', '.', '\t':
			return -1
		}
		return unicode.ToLower(r)
	}, s)
}

// sameModel is the match rule of docs/design.md#model-identity: one name contains the other
// once both are normalised, so "Z-Image" matches "z_image turbo".
func sameModel(expected, actual string) bool {
	a, b := modelKey(expected), modelKey(actual)
	return strings.Contains(a, b) || strings.Contains(b, a)
}

// checkModel is the identity check of docs/design.md#model-identity, after a success: the
// model the service says it ran (data.model_name) against the model's
// upstream_name. A mismatch is counted every time and warned about once
// per model per config load; with on_mismatch refuse the image is not
// returned (the answer is a 502 model_mismatch). An answer without a
// model_name, or a model without an upstream_name, is not checked.
func (g *Gateway) checkModel(j *job) *apiError {
	m := j.model
	actual := j.info.modelName
	if m.upstreamKey == "" || modelKey(actual) == "" || sameModel(m.upstreamName, actual) {
		return nil
	}
	metricModelMismatch.WithLabelValues(m.name).Inc()
	// both names scrubbed, then shortened (the service's text is not ours)
	want := truncate(g.scrub.Replace(m.upstreamName), maxMismatchRunes)
	got := truncate(g.scrub.Replace(actual), maxMismatchRunes)
	if m.warned.CompareAndSwap(false, true) {
		g.logger.Warn("the image service ran another model than configured: its model menu has moved",
			zap.String("model", m.name), zap.Int("model_index", m.modelIndex),
			zap.String("expected", want), zap.String("actual", got),
			zap.Bool("refused", m.refuse),
			zap.String("fix", "run `caddy zimage-models` to list the service's menu, then set model_index (or upstream_name)"))
	}
	if !m.refuse {
		return nil
	}
	e := &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "model_mismatch",
		message: fmt.Sprintf("The image service's model_index %d now gives the model %q, not %q: the gateway's model %s refuses it (on_mismatch refuse). "+
			"Set model_index of model %s to the index of %q in the service's menu (`caddy zimage-models` lists it), or set its upstream_name to %q to accept this model",
			m.modelIndex, got, want, m.name, m.name, want, got)}
	g.logGeneration(j, e.status, "model_mismatch")
	return e
}

// lookupModel finds a model by name or alias, case-insensitively; an empty
// name selects the first configured model.
func (g *Gateway) lookupModel(name string) *model {
	if strings.TrimSpace(name) == "" {
		return g.models[0]
	}
	if m, ok := g.modelIndex[strings.ToLower(strings.TrimSpace(name))]; ok {
		return m
	}
	return nil
}

func unmarshalModel(d *caddyfile.Dispenser) (ModelConfig, error) {
	var m ModelConfig
	if !d.NextArg() {
		return m, d.Err("zimage_gateway: model needs a name")
	}
	m.Name = d.Val()
	if d.NextArg() {
		return m, d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && opt != "alias" {
			return m, d.Errf("zimage_gateway: model %s: %s already specified", m.Name, opt)
		}
		seen[opt] = true
		var err error
		switch opt {
		case "alias":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return m, d.ArgErr()
			}
			m.Aliases = append(m.Aliases, args...)
		case "model_index":
			var n int
			n, err = parseInt(d, 0)
			m.ModelIndex = &n
		case "steps":
			m.Steps, err = parseInt(d, 1)
		case "cfg":
			var s string
			if s, err = singleArg(d); err == nil {
				f, perr := strconv.ParseFloat(s, 64)
				if perr != nil || f <= 0 || f > 30 {
					return m, d.Errf("zimage_gateway: model %s: invalid cfg '%s': want a number in (0, 30]", m.Name, s)
				}
				m.CFG = &f
			}
		case "negative_prompt":
			m.NegativePrompt, err = singleArg(d)
		case "upstream_name":
			m.UpstreamName, err = singleArg(d)
		case "on_mismatch":
			if m.OnMismatch, err = singleArg(d); err == nil && m.OnMismatch != onMismatchWarn && m.OnMismatch != onMismatchRefuse {
				return m, d.Errf("zimage_gateway: model %s: invalid on_mismatch '%s': want warn or refuse", m.Name, m.OnMismatch)
			}
		case "edit":
			if d.NextArg() {
				return m, d.ArgErr()
			}
			m.Edit = true
		case "default_response_format":
			if m.DefaultResponseFormat, err = singleArg(d); err == nil {
				if _, perr := parseDefaultFormat(m.DefaultResponseFormat); perr != nil {
					return m, d.Errf("zimage_gateway: model %s: %v", m.Name, perr)
				}
			}
		case "responses_text":
			var on bool
			on, err = parseOnOff(d)
			m.ResponsesText = &on
		default:
			return m, d.Errf("unrecognized zimage_gateway model option '%s'", opt)
		}
		if err != nil {
			return m, err
		}
	}
	return m, nil
}

// modelObject is one entry of /v1/models. SupportedEndpointTypes is New
// API's convention, which Cherry Studio's "New API" provider reads to put
// a model on its painting page ("image-generation") as well as in chat.
type modelObject struct {
	ID                     string   `json:"id"`
	Object                 string   `json:"object"`
	Created                int64    `json:"created"`
	OwnedBy                string   `json:"owned_by"`
	SupportedEndpointTypes []string `json:"supported_endpoint_types"`
}

// endpointTypes are what every model serves: the Images API, chat
// completions and the Responses API.
var endpointTypes = []string{"image-generation", "openai", "openai-response"}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

func (m *model) object() modelObject { return m.objectAs(m.name) }

// objectAs is the model's entry under one of its names.
func (m *model) objectAs(id string) modelObject {
	return modelObject{ID: id, Object: "model", Created: m.created, OwnedBy: "sd-exacg-gateway", SupportedEndpointTypes: endpointTypes}
}

func (g *Gateway) serveModels(w http.ResponseWriter) {
	// encoded once in Provision: writeJSON would re-validate it every time
	writeJSONBytes(w, http.StatusOK, g.modelsJSON)
	metricRequests.WithLabelValues(endpointModels, "", "200").Inc()
}

func (g *Gateway) serveModel(w http.ResponseWriter, id string) {
	// aliases resolve too, but the object names the model as listed:
	// under the alias when aliases are listed
	m := g.lookupModel(id)
	if m == nil || strings.TrimSpace(id) == "" {
		g.failRequest(w, endpointModels, "", errModelNotFound(id))
		return
	}
	obj := m.object()
	if g.ListAliases {
		for _, mc := range g.Models {
			for _, a := range mc.Aliases {
				if strings.EqualFold(strings.TrimSpace(a), strings.TrimSpace(id)) {
					obj = m.objectAs(strings.TrimSpace(a))
				}
			}
		}
	}
	writeJSON(w, http.StatusOK, obj)
	metricRequests.WithLabelValues(endpointModels, m.name, "200").Inc()
}

// hasEditModel tells whether any model edits images (docs/design.md#edits).
func (g *Gateway) hasEditModel() bool {
	for _, m := range g.models {
		if m.edit {
			return true
		}
	}
	return false
}
