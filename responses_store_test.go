package zimage

// Kept responses: multi-turn edits through previous_response_id, a
// response visible to its own client only, the sweep of old ones, and the
// slot a GET holds.

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/responses"
	"golang.org/x/sync/semaphore"
)

// A generation, then "make it night" on the edit model with
// previous_response_id: the picture the first response made is edited.
func TestResponsesMultiTurnEdit(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	client := sdkFor(baseURL+"/v1/", testClientKey)
	ctx := context.Background()
	first, err := client.Responses.New(ctx, respText("Z-Image", "a lighthouse on a cliff"))
	if err != nil {
		t.Fatal(err)
	}
	stored := storeURLPattern.FindString(first.OutputText())
	if stored == "" {
		t.Fatalf("no store URL in %q", first.OutputText())
	}
	p := respText("Qwen-Image-Edit", "make it night")
	p.PreviousResponseID = openai.String(first.ID)
	second, err := client.Responses.New(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	bodies, sources := f.got()
	last := bodies[len(bodies)-1]
	// the 12×8 picture, fitted into the service's sides keeping its ratio
	if last["image_source"] != stored || last["prompt"] != "make it night" || last["model_index"] != float64(19) ||
		last["width"] != float64(96) || last["height"] != float64(64) || string(sources[len(sources)-1]) != string(f.result) {
		t.Errorf("edit call %v, want image_source %s", last, stored)
	}
	if second.PreviousResponseID != first.ID || !strings.Contains(second.OutputText(), "**🖼️ Source:** <"+stored+">") {
		t.Errorf("second response %.400s", second.RawJSON())
	}

	// on a generation model, the new text is generated anew
	p = respText("Z-Image", "a lighthouse at dawn")
	p.PreviousResponseID = openai.String(first.ID)
	if _, err := client.Responses.New(ctx, p); err != nil {
		t.Fatal(err)
	}
	bodies, _ = f.got()
	if last := bodies[len(bodies)-1]; last["image_source"] != nil || last["prompt"] != "a lighthouse at dawn" {
		t.Errorf("generation after a previous response: %v", last)
	}
}

// A response belongs to the client that made it: another client's id is
// the same 404 as an unknown one, in GET, DELETE and previous_response_id.
func TestResponsesOtherClient(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", fmt.Sprintf("client bob {\n\t\tkey %s\n\t}", testBobKey))
	ctx := context.Background()
	owner := sdkFor(baseURL+"/v1/", testClientKey)
	bob := sdkFor(baseURL+"/v1/", testBobKey)
	r, err := owner.Responses.New(ctx, respText("Z-Image", "a cat"))
	if err != nil {
		t.Fatal(err)
	}
	unknown := "resp_" + strings.Repeat("0", 48)
	for _, id := range []string{r.ID, unknown, "resp_../../images/x", "nonsense"} {
		_, err = bob.Responses.Get(ctx, id, responses.ResponseGetParams{})
		getErr := wantAPIError(t, "bob's GET "+id, err, 404, "not_found")
		err = bob.Responses.Delete(ctx, id)
		wantAPIError(t, "bob's DELETE "+id, err, 404, "not_found")
		p := respText("Qwen-Image-Edit", "make it night")
		p.PreviousResponseID = openai.String(id)
		_, err = bob.Responses.New(ctx, p)
		prevErr := wantAPIError(t, "bob's previous_response_id "+id, err, 404, "not_found")
		if prevErr.Param != "previous_response_id" || id == r.ID && getErr.Message != prevErr.Message {
			t.Errorf("errors %q (param %q), %q", prevErr.Message, prevErr.Param, getErr.Message)
		}
	}
	// bob's DELETE left it: the owner still has it
	if _, err := owner.Responses.Get(ctx, r.ID, responses.ResponseGetParams{}); err != nil {
		t.Errorf("owner's GET after bob's DELETE: %v", err)
	}
}

// The sweep deletes kept responses older than max_age with the images,
// without counting them as images, and leaves other names alone.
func TestUnitResponsesSweep(t *testing.T) {
	st, fsto := newTestFileStore(t, time.Hour)
	ctx := context.Background()
	old, fresh := "resp_"+strings.Repeat("a", 48), "resp_"+strings.Repeat("b", 48)
	foreign := st.prefix + "/" + responsesDir + "notes.json"
	for _, key := range []string{st.responseKey(old), st.responseKey(fresh), foreign} {
		if err := fsto.Store(ctx, key, []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	makeOld(t, fsto, st.responseKey(old), 2*time.Hour)
	makeOld(t, fsto, foreign, 2*time.Hour)
	before := storeCounter(t, metricStoreDeleted)
	if n, err := st.sweep(ctx); err != nil || n != 1 {
		t.Fatalf("sweep: %d, %v; want 1 deleted", n, err)
	}
	if fsto.Exists(ctx, st.responseKey(old)) || !fsto.Exists(ctx, st.responseKey(fresh)) || !fsto.Exists(ctx, foreign) {
		t.Error("the sweep deleted the wrong entries")
	}
	if d := storeCounter(t, metricStoreDeleted) - before; d != 0 {
		t.Errorf("store_deleted_total +%v for a response, want +0 (it counts images)", d)
	}
}

// GET holds the kept image in a download slot, as b64_json answers do, so
// the slots still bound the memory of every answer that carries bytes.
func TestUnitResponsesGetHoldsASlot(t *testing.T) {
	st, _ := newTestFileStore(t, 0)
	ctx := context.Background()
	name, _, err := st.put(ctx, storeTestPNG(t, 4, 4))
	if err != nil {
		t.Fatal(err)
	}
	g := &Gateway{store: st, fetcher: &imageFetcher{slots: semaphore.NewWeighted(1)}, timeout: time.Millisecond}
	rec := &storedResponse{ID: "resp_" + strings.Repeat("c", 48), CallID: "ig_1", Image: name, Width: 4, Height: 4, OutputFormat: "png"}
	if err := g.saveResponse(ctx, rec); err != nil {
		t.Fatal(err)
	}
	get := func() *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		g.serveStoredResponse(w, httptest.NewRequest(http.MethodGet, "/v1/responses/"+rec.ID, nil), nil, rec.ID)
		return w
	}
	release, e := g.fetcher.acquire(ctx, 1) // every slot taken
	if e != nil {
		t.Fatal(e)
	}
	if w := get(); w.Code != http.StatusServiceUnavailable || apiErrOf(t, w).Code != "busy" || w.Header().Get("Retry-After") == "" {
		t.Errorf("GET with every slot taken: %d %s", w.Code, w.Body)
	}
	release()
	if w := get(); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"result":"iVBORw0KGgo`) {
		t.Errorf("GET with a slot free: %d %.200s", w.Code, w.Body)
	}
}
