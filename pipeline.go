package zimage

import (
	"context"
	"net/http"
	"strconv"

	"golang.org/x/sync/errgroup"
)

// The pipeline (docs/design.md#the-data-path): every endpoint is a
// decoder and a renderer. The decoder turns the request into an ask; serve
// takes the ask through the steps in one order for all of them, so a new
// step is written once:
//
//	admit ─► job ─► enhance ─► generate n (in parallel: account, slot,
//	retries, the model check, the log line) ─► keep ─► render
//
// Streaming is a renderer that begins its answer before the work and keeps
// the connection alive while it runs; it does not fork the pipeline.

// ask is what a request asked for, as its endpoint decoded it: the one
// value the pipeline works from. A generation has params, an edit has
// edit; every check that needs only the request is done when it is made.
type ask struct {
	endpoint  string
	model     *model
	requested string // the model name as the client sent it, echoed back

	params jobParams // a generation: the prompt and its numbers
	edit   *editAsk  // an edit: its instruction, source and size; nil otherwise
	n      int       // images to make, at least 1

	// the answer uses the images' bytes when they can be downloaded and
	// goes out with the URLs alone otherwise (an Images API answer with
	// both forms, which the client did not ask for by name)
	bytesOptional bool

	// up is the share of the upload budget the request's body holds; it
	// is given back once the edit's source is stored (or at the end)
	up  *upload
	out renderer
}

// modelName is the configured name of the ask's model for the metrics,
// "" before the decoder found one.
func (q *ask) modelName() string {
	if q.model == nil {
		return ""
	}
	return q.model.name
}

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
	// event, and keeps the connection alive until write or writeFailure.
	begin(w http.ResponseWriter, j *job)
	// needBytes says whether write needs the images' bytes.
	needBytes() bool
	// write answers the result; writeFailure answers an error, in the
	// stream when one has begun.
	write(w http.ResponseWriter, res *output)
	writeFailure(w http.ResponseWriter, j *job, e *apiError)
}

// admission is what one request holds of its client's limits: its
// generation slots (here and, with coordination, across the cluster) and
// its reservation of the client's quotas. It is made when the client is
// known (ServeHTTP) and given back when the request ends, whatever step it
// ended in; the images made stay counted.
type admission struct {
	client *client
	held   int        // the client's slots this request holds here
	lease  slotLease  // the same slots across a cluster (coordination.go)
	quota  *quotaHold // its reservation of the client's quotas (quotas.go)
}

// admit makes the request hold n of its client's generation slots and
// reserve n images of its quotas, or refuses at once: a client at its
// max_concurrent never waits in the upstream queue, where it would take
// other clients' places. It is the pipeline's first step; an upload calls
// it for one image before its body is read (uploads.go), since the body
// takes a share of the process's upload budget, and the pipeline then
// asks again with the whole n, which takes only what is not held yet.
func (a *admission) admit(ctx context.Context, n int) *apiError {
	if a == nil || a.client == nil {
		return nil
	}
	took, e := a.admitSlots(ctx, n)
	if e != nil {
		return e
	}
	reserved := 0
	if a.quota != nil {
		reserved = a.quota.n
	}
	if e := a.reserveQuota(ctx, n-reserved); e != nil {
		a.giveBackSlots(took)
		return e
	}
	return nil
}

// release gives back what the request holds; a second call does nothing.
func (a *admission) release() {
	a.releaseQuota(context.Background())
	if a.lease != nil {
		a.lease.release()
		a.lease = nil
	}
	if a.held > 0 {
		a.client.lim.release(a.held)
		a.held = 0
	}
}

// serve takes q through the pipeline and answers with its renderer. The
// client (in adm) and the request's origin are arguments of the steps
// that need them, never values parked in the request's context.
func (g *Gateway) serve(w http.ResponseWriter, r *http.Request, adm *admission, q *ask) {
	// an edit's uploaded source is stored by the job step, then the
	// upload's share is free; on any earlier way out, here
	defer q.up.release()
	if e := adm.admit(r.Context(), q.n); e != nil {
		g.failRequest(w, q.endpoint, q.model.name, e)
		return
	}
	// the origin the client saw, once: the demo's image URLs, the
	// store's URLs of the images and of an edit's source
	origin := requestOrigin(r)
	var j *job
	var e *apiError
	if q.edit != nil {
		j, e = g.newEditJob(r.Context(), q, adm, origin)
		q.up.release()
	} else {
		j, e = g.newJob(q, adm, origin)
	}
	if e != nil {
		g.failRequest(w, q.endpoint, q.model.name, e)
		return
	}

	ctx := r.Context()
	q.out.begin(w, j)
	res, release, e := g.produce(ctx, j, q.n, q.out.needBytes())
	if e != nil {
		g.discardSource(ctx, j)
		q.out.writeFailure(w, j, e)
		metricRequests.WithLabelValues(j.endpoint, j.model.name, strconv.Itoa(e.status)).Inc()
		return
	}
	// the download slots are held until the images are written: they are
	// what bounds the memory of b64_json answers
	defer release()
	q.out.write(w, res)
	metricRequests.WithLabelValues(j.endpoint, j.model.name, "200").Inc()
}

// produce runs the work of the pipeline for n images of base: the
// enhancement (once for all n), the generations in parallel, and the copy
// into the store (with the bytes when wanted). release gives back the
// download slots of the bytes.
func (g *Gateway) produce(ctx context.Context, base *job, n int, wantBytes bool) (*output, func(), *apiError) {
	g.runEnhance(ctx, base)
	jobs, e := g.generateN(ctx, base, n)
	if e != nil {
		return nil, nil, e
	}
	// a failed copy keeps the upstream's URL; only a b64_json download
	// that fails fails the request
	images, release, e := g.keep(ctx, jobs, wantBytes)
	// each generation's line is written once its image is kept, so that
	// it can say where the answer's image lives
	for _, j := range jobs {
		if e != nil {
			g.logGeneration(j, e.status, "download")
		} else {
			g.logGeneration(j, http.StatusOK, "")
		}
	}
	if e != nil {
		return nil, nil, e
	}
	return &output{jobs: jobs, images: images}, release, nil
}

// generateN runs n generations of one enhanced job in parallel (each waits
// for its own slot in the account pool), with seed, seed+1, … when the
// client fixed the seed and fresh random seeds otherwise. The first failure
// cancels the others and fails the request: errgroup keeps the first error
// and cancels in the same step, so a sibling's cancellation can never be
// taken for the cause.
func (g *Gateway) generateN(ctx context.Context, base *job, n int) ([]*job, *apiError) {
	if n == 1 {
		// one image, as every chat asks for: no goroutine, context or copy
		// of the job (the hot path)
		if e := g.generate(ctx, base); e != nil {
			return nil, e
		}
		return []*job{base}, nil
	}
	eg, ctx := errgroup.WithContext(ctx)
	jobs := make([]*job, n)
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
		eg.Go(func() error {
			if e := g.generate(ctx, jobs[i]); e != nil {
				return e // a nil *apiError must not become a non-nil error
			}
			return nil
		})
	}
	if err := eg.Wait(); err != nil {
		return nil, err.(*apiError)
	}
	return jobs, nil
}

// discardSource deletes the stored source of an edit that failed: the
// store is no free file host. Sources that were stored before this
// request (the same bytes) stay.
func (g *Gateway) discardSource(ctx context.Context, j *job) {
	if !j.edit || j.sourceName == "" || j.sourceDuplicate || g.store == nil {
		return
	}
	g.store.remove(ctx, j.sourceName)
}
