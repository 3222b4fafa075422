package zimage

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

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

	// Edit marks an edit model (SPEC §10): it takes a source image and an
	// instruction, as the service's Qwen Image Edit models (model_index 18
	// and 19) do, and serves /v1/images/edits and chat messages with an
	// image. Steps, cfg and negative_prompt do not apply to it.
	Edit bool `json:"edit,omitempty"`
}

// model is a resolved ModelConfig.
type model struct {
	name           string
	modelIndex     int
	steps          int
	cfg            float64
	negativePrompt string
	created        int64
	edit           bool // an edit model (SPEC §10)
}

// provisionModels fills model defaults and builds the case-insensitive index
// of names and aliases.
func (g *Gateway) provisionModels() error {
	cfgs := g.Models
	if len(cfgs) == 0 {
		cfgs = []ModelConfig{{Name: defaultModelName}}
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
	for _, m := range g.models {
		list.Data = append(list.Data, m.object())
	}
	var err error
	g.modelsJSON, err = json.Marshal(list)
	return err
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
		case "edit":
			if d.NextArg() {
				return m, d.ArgErr()
			}
			m.Edit = true
		default:
			return m, d.Errf("unrecognized zimage_gateway model option '%s'", opt)
		}
		if err != nil {
			return m, err
		}
	}
	return m, nil
}

// modelObject is one entry of /v1/models.
type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

func (m *model) object() modelObject {
	return modelObject{ID: m.name, Object: "model", Created: m.created, OwnedBy: "sd-exacg-gateway"}
}

func (g *Gateway) serveModels(w http.ResponseWriter) {
	// encoded once in Provision: writeJSON would re-validate it every time
	writeJSONBytes(w, http.StatusOK, g.modelsJSON)
	metricRequests.WithLabelValues(endpointModels, "", "200").Inc()
}

func (g *Gateway) serveModel(w http.ResponseWriter, id string) {
	// aliases resolve too, but the object names the model as listed
	m := g.lookupModel(id)
	if m == nil || strings.TrimSpace(id) == "" {
		g.fail(w, endpointModels, "", errModelNotFound(id))
		return
	}
	writeJSON(w, http.StatusOK, m.object())
	metricRequests.WithLabelValues(endpointModels, m.name, "200").Inc()
}

// hasEditModel tells whether any model edits images (SPEC §10).
func (g *Gateway) hasEditModel() bool {
	for _, m := range g.models {
		if m.edit {
			return true
		}
	}
	return false
}
