package zimage

import (
	"context"
	"net/http"
	"strconv"
)

// The pipeline (STYLE.md, "the data path"): every endpoint decodes its
// request into a job, then hands it to run with its own renderer. run
// takes the steps in one order for all of them, so a new step is written
// once:
//
//	enhance ─► generate (n in parallel: account, slot, retries, and the
//	           check that the model that ran is the one asked for) ─► keep ─► render
//
// Streaming is a renderer that begins its answer before the work and keeps
// the connection alive while it runs; it does not fork the pipeline.

// output is what the pipeline made of one request: a job per image and,
// for a renderer that wants the bytes (b64_json, streamed images), the
// images, held in their download slots until the answer is written.
type output struct {
	jobs   []*job
	images [][]byte
}

// renderer is an endpoint's way out.
type renderer interface {
	// begin runs before the work: a stream sends its headers and first
	// event, and keeps the connection alive until write or fail.
	begin(w http.ResponseWriter, j *job)
	// needBytes says whether write needs the images' bytes.
	needBytes() bool
	// write answers the result; fail answers an error.
	write(w http.ResponseWriter, res *output)
	fail(w http.ResponseWriter, j *job, e *apiError)
}

// run takes j through the pipeline for n images and answers with out.
func (g *Gateway) run(w http.ResponseWriter, r *http.Request, j *job, n int, out renderer) {
	ctx := r.Context()
	out.begin(w, j)
	res, release, e := g.produce(ctx, r, j, n, out.needBytes())
	if e != nil {
		g.discardSource(r.Context(), j)
		out.fail(w, j, e)
		metricRequests.WithLabelValues(j.endpoint, j.model.name, strconv.Itoa(e.status)).Inc()
		return
	}
	// the download slots are held until the images are written: they are
	// what bounds the memory of b64_json answers (issue 8)
	defer release()
	out.write(w, res)
	metricRequests.WithLabelValues(j.endpoint, j.model.name, "200").Inc()
}

// produce runs the steps of the pipeline for n images of base: the
// enhancement (once for all n), the generations in parallel, and the copy
// into the store (with the bytes when wanted). release gives back the
// download slots of the bytes.
func (g *Gateway) produce(ctx context.Context, r *http.Request, base *job, n int, wantBytes bool) (*output, func(), *apiError) {
	g.runEnhance(ctx, base)
	jobs, e := g.generateN(ctx, base, n)
	if e != nil {
		return nil, nil, e
	}
	// a failed copy keeps the upstream's URL; only a b64_json download
	// that fails fails the request
	images, release, e := g.keep(ctx, r, jobs, wantBytes)
	if e != nil {
		return nil, nil, e
	}
	return &output{jobs: jobs, images: images}, release, nil
}

// discardSource deletes the stored source of an edit that failed (SPEC
// §10.3): the store is no free file host. Sources that were stored before
// this request (the same bytes) stay.
func (g *Gateway) discardSource(ctx context.Context, j *job) {
	if !j.edit || j.sourceName == "" || j.sourceDuplicate || g.store == nil {
		return
	}
	g.store.remove(ctx, j.sourceName)
}
