package zimage

// The pipeline's keep step (docs/design.md#the-store): after a successful
// generation, download each image once when the store or a b64_json answer
// needs its bytes, and copy it into the store, so that answers name the
// gateway's own lasting URL instead of the image service's expiring one.

import (
	"context"

	"go.uber.org/zap"
)

// keep is the pipeline's step after a successful generation (docs/design.md#the-store):
// it downloads the images of jobs when the store or a b64_json answer
// needs them, copies them into the store and points the jobs at their
// store URLs (for the origin each job was asked from). A copy that fails
// is never a new failure: the job keeps the upstream's URL, a warn line
// names the cause and store_images_total{result="failed"} counts it.
// With needBytes (b64_json) the downloaded images are returned, one
// download per image, and a failed download fails the request; release
// must then be called once they are written.
func (g *Gateway) keep(ctx context.Context, jobs []*job, needBytes bool) (images [][]byte, release func(), e *apiError) {
	release = func() {}
	if g.store == nil && !needBytes {
		return nil, release, nil
	}
	// bytes that are only nice to have (an answer with both forms) do not
	// fail the request: the image goes out with its URL alone
	failFast := needBytes && !jobs[0].bytesOptional
	images, errs, release, e := g.downloadAll(ctx, jobs, failFast)
	if e == nil {
		for i, j := range jobs {
			if images[i] != nil {
				ext, _, _ := sniffImage(images[i])
				j.gotWidth, j.gotHeight = imageSize(images[i], ext)
			}
		}
	}
	if e != nil {
		if failFast {
			return nil, func() {}, e
		}
		// no slot in time: every copy failed, the answer goes on
		for _, j := range jobs {
			if g.store != nil {
				g.copyFailed(j, e.message)
			}
		}
		return nil, func() {}, nil
	}
	if g.store != nil {
		for i, j := range jobs {
			if errs[i] != nil {
				g.copyFailed(j, errs[i].message)
				continue
			}
			name, _, err := g.store.put(ctx, images[i])
			if err != nil {
				g.copyFailed(j, err.Error())
				continue
			}
			j.stored = name
			j.imageURL = g.store.url(j.origin, name)
		}
	}
	if !needBytes {
		release()
		return nil, func() {}, nil
	}
	return images, release, nil
}

// copyFailed records a copy into the store that did not happen.
func (g *Gateway) copyFailed(j *job, cause string) {
	metricStoreImages.WithLabelValues(storeFailed).Inc()
	g.logger.Warn("copying the image into the store failed; the answer keeps the image service's URL",
		zap.String("endpoint", j.endpoint), zap.String("error", g.scrub.Replace(cause)))
}
